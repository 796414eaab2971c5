#!/usr/bin/env python3
"""A scan cut along the axis, as every body scan is: the default run with and without training past the
cut ends (CTNeRFReconLib/axial_extension.py).

Takes an RTK case made by rtk_reference.py (the whole object on the detector) and keeps only the middle
`--rows` rows of its projections, so the object goes on past the detector's top and bottom edges. Each
variant runs our command line on that scan without a reference (the default grid: the box every view
sees, shorter along the axis than the object) and is scored with the referee's score.py (`--margin 2`)
against the ground truth cut to the default grid's extent along the axis (what lies past it is not
reconstructed by anyone), and by the RMS error in the inner half, the next 30 % and the outer fifth of
that extent (the truncation's error sits at the ends). Prints a table and writes JSON.

    python benchmarks/bench_axial_cut.py --case ~/.cache/ctnerf_bench/abdomen_scaled08_40v_det200_p3.2 \\
        --rows 90 --variants default no-extension plain --time-limit 180 --out bench_results/axial_cut

Variants: `default`; `no-extension` (`--setting extend_cut_ends=false`: the box ends at the faces and
the TV stays plain, as before 2026-12-06); `plain` (the extension with plain TV, `tv_edge=0`);
`no-extension-edge` is not offered (it needs the trainer's truncation fallback off; docs/nerf.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_default_grid import referee_score  # noqa: E402
from bench_nerf import prebuild_kernels  # noqa: E402

VARIANTS = {"default": [], "no-extension": ["--setting", "extend_cut_ends=false"],
            "plain": ["--setting", "tv_edge=0"]}


def cut_case(case: Path, rows: int, out: Path) -> tuple[Path, Path]:
    """(data folder, reference cut to the default grid along y): the case's middle `rows` rows."""
    from CTNeRFReconLib.fov import default_grid
    from CTNeRFReconLib.formats import load_scan

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    proj = sitk.ReadImage(str(case / "projections.mha"))
    n_rows = proj.GetSize()[1]
    if not 0 < rows < n_rows:
        raise SystemExit(f"--rows must be between 1 and the case's {n_rows} rows, got {rows}")
    first = (n_rows - rows) // 2
    sitk.WriteImage(proj[:, first:first + rows, :], str(data / "projections.mha"))  # the origin follows the crop
    shutil.copy(case / "geometry.xml", data / "geometry.xml")
    grid = default_grid(load_scan(data).geometry)
    lo, hi = grid.bounds()
    ref = sitk.ReadImage(str(case / "reference.nrrd"))
    y = ref.GetOrigin()[1] + ref.GetSpacing()[1] * np.arange(ref.GetSize()[1])
    keep = np.nonzero((y >= lo[1]) & (y <= hi[1]))[0]
    cut = out / "reference_cut.nrrd"
    sitk.WriteImage(ref[:, int(keep[0]):int(keep[-1]) + 1, :], str(cut))
    return data, cut


def score(score_py: Path, reference: Path, volume: Path) -> dict:
    """score.py --margin 2, and the RMS error (1/mm) by band of |y| over the reference's extent."""
    out = referee_score(score_py, reference, volume, margin=2)
    ref = sitk.ReadImage(str(reference), sitk.sitkFloat32)
    truth = sitk.GetArrayFromImage(ref)
    ours = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(volume), sitk.sitkFloat32), ref,
                                                sitk.Transform(), sitk.sitkLinear, 0.0))
    y = np.abs(ref.GetOrigin()[1] + ref.GetSpacing()[1] * np.arange(ref.GetSize()[1]))
    a = y / y.max()
    bands = {"inner_half": a < 0.5, "next_30pc": (a >= 0.5) & (a < 0.8), "outer_fifth": a >= 0.8}
    rms = {name: float(np.sqrt(np.mean((ours[:, sel] - truth[:, sel]) ** 2))) for name, sel in bands.items()}
    return {"psnr": out["psnr"], "ssim": out["ssim"], "scorer": out["scorer"], "rms": rms}


def add_common_arguments(ap: argparse.ArgumentParser):
    """The budget, score.py and output arguments this script shares with bench_lateral_cut.py."""
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--time-limit", type=float, default=180.0)
    budget.add_argument("--iterations", type=int, help="a fixed count instead of the time limit (the end point, "
                        "free of the host's speed)")
    ap.add_argument("--score-py", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "bench" / "score.py")
    ap.add_argument("--out", type=Path, required=True)


def parse_checked(ap: argparse.ArgumentParser) -> argparse.Namespace:
    args = ap.parse_args()
    if not args.score_py.exists():
        raise SystemExit(f"the referee's score.py is not at {args.score_py}: pass --score-py")
    return args


def run_row(data: Path, args: argparse.Namespace, name: str, extra: list[str]) -> tuple[dict, Path]:
    """(the table row's run facts, the run folder): our command line on `data` with the budget asked and
    the variant's `extra` arguments, into args.out / run_NAME, and what its run.json says of the
    budget, the training grid and the extensions."""
    run = args.out / f"run_{name}"
    budget = ["--iterations", str(args.iterations)] if args.iterations else ["--time-limit", f"{args.time_limit:g}"]
    cmd = [sys.executable, "-m", "CTNeRFReconLib", "reconstruct", str(data), "--out", str(run), "--overwrite",
           *budget, "--quiet", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - t0
    report = json.loads((run / "run.json").read_text())["method_report"]
    support = report["support"]
    return dict(variant=name, args=extra, seconds=round(seconds, 1),
                iterations=(report.get("time_budget") or {}).get("iterations_done", args.iterations),
                training_grid=support.get("training_grid_shape_xyz"), widened=support.get("widened"),
                extended=support.get("extended"), tv_prior=report["tv_prior"]), run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", type=Path, required=True, help="an RTK case folder (rtk_reference.py)")
    ap.add_argument("--rows", type=int, required=True, help="detector rows kept (the middle ones)")
    ap.add_argument("--variants", nargs="+", default=["default", "no-extension"], choices=sorted(VARIANTS))
    add_common_arguments(ap)
    args = parse_checked(ap)
    data, reference = cut_case(args.case.expanduser(), args.rows, args.out)
    prebuild_kernels()
    rows = []
    for name in args.variants:
        row, run = run_row(data, args, name, VARIANTS[name])
        rows.append(dict(row, **score(args.score_py, reference, run / "volume.nrrd")))
    print(f"{args.case.name}, middle {args.rows} rows, default grid, "
          + (f"{args.iterations} iterations" if args.iterations else f"--time-limit {args.time_limit:g}")
          + ", score.py --margin 2 on the truth cut to the grid")
    print(f"{'variant':14s} {'PSNR3D':>7s} {'SSIM3D':>7s} {'iters':>6s} {'seconds':>8s}  {'training grid':>14s}  "
          f"{'past the ends (mm)':>18s}  RMS x1e3 inner / next / outer fifth")
    for r in rows:
        ext = "-" if not r["extended"] else " / ".join(f"{v:g}" for v in r["extended"]["mm"])
        print(f"{r['variant']:14s} {r['psnr']:7.2f} {r['ssim']:7.3f} {r['iterations']:6d} {r['seconds']:8.1f}  "
              f"{'x'.join(map(str, r['training_grid'] or [])):>14s}  {ext:>18s}  "
              + " / ".join(f"{1e3 * r['rms'][k]:.2f}" for k in ("inner_half", "next_30pc", "outer_fifth")))
    result = dict(case=str(args.case), rows=args.rows, time_limit_s=None if args.iterations else args.time_limit,
                  iterations=args.iterations, cpu_count=os.cpu_count(),
                  load_average=list(os.getloadavg()), scorer="score.py --margin 2", results=rows)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
