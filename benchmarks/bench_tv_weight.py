#!/usr/bin/env python3
"""The TV weight swept around the one the data give, on the reference's grid and on the default grid.

Why: the derived weight (nerf/prior_weight.py) was fitted on 3 mm reference grids. A user without a
reference gets the default grid at the rays' spacing, often finer, and a different training voxel h
changes what the same weight means. This runs our command line as a user would (`reconstruct` on the
case's folder; `--reference` grid when the folder holds reference.nrrd, the default grid on a copy
without it), with the weight the data give and with multiples of it, at a fixed iteration count (so
that a busy machine changes the seconds, not the result), and scores every volume with the referee's
score.py. It prints a table and writes JSON: the weight, h over the rays' spacing at the isocentre
d, PSNR3D / SSIM3D, seconds.

    python benchmarks/bench_tv_weight.py --ct ~/.cache/ctnerf_bench/cts/abdomen_scaled08_ct.nii.gz \
        --views 40 --det 160 --pitch 3.2 --grids reference default --weights derived x0.5 x2

`--weights`: `derived` (what the formula gives), `xK` (K times that; runs `derived` first to learn it),
or a number (that weight).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_default_grid import projections_only, referee_score  # noqa: E402
from bench_nerf import prebuild_kernels  # noqa: E402
from rtk_reference import add_case_options, case_for, require_ct  # noqa: E402


def run_one(case: Path, grid: str, weight: float | None, iterations: int, out: Path, score_py: Path,
            margin: int) -> dict:
    """One `reconstruct` run on `grid` ('reference' or 'default') with `weight` (None: the derived one)."""
    label = f"{grid}_{'derived' if weight is None else f'{weight:.6g}'}"
    run_dir = out / f"run_{label}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    data = case if grid == "reference" else projections_only(case, out)
    cmd = [sys.executable, "-m", "CTNeRFReconLib", "reconstruct", str(data), "--out", str(run_dir),
           "--method", "nerf", "--device", "cpu", "--iterations", str(iterations)]
    if weight is not None:
        cmd += ["--tv-weight", f"{weight:.6g}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{label} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    run = json.loads((run_dir / "run.json").read_text())
    expected = "field of view" if grid == "default" else "data reference"
    if run["grid"].get("source") != expected:
        raise RuntimeError(f"{label}: the output grid came from '{run['grid'].get('source')}', not the {expected}")
    report = run.get("method_report") or {}
    tv = report.get("tv_prior") or {}
    score = referee_score(score_py, case / "reference.nrrd", run_dir / "volume.nrrd", margin)
    return dict(grid=grid, weight=tv["weight"], weight_from=tv.get("weight_from"),
                plain_tv_because=tv.get("plain_because"),
                training_grid=(report.get("support") or {}).get("training_grid_shape_xyz"),
                training_voxel_mm=tv["voxel_mm"], ray_spacing_mm=tv["ray_spacing_mm"],
                h_over_d=round(tv["voxel_mm"] / tv["ray_spacing_mm"], 3), output_grid=run["grid"]["shape_xyz"],
                seconds=round(seconds, 1), psnr=score["psnr"], ssim=score["ssim"], scorer=score["scorer"])


def main(argv=None):
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_options(ap)
    ap.add_argument("--views", type=int, default=25)
    ap.add_argument("--grids", nargs="+", choices=["reference", "default"], default=["reference", "default"])
    ap.add_argument("--weights", nargs="+", default=["derived", "x0.5", "x2"])
    ap.add_argument("--iterations", type=int, default=1200,
                    help="fixed, so the load on the machine changes only the seconds (1200: where the 25-view "
                         "abdomen's end point is reached)")
    ap.add_argument("--score-py", type=Path, default=here.parent / "shared" / "bench" / "score.py")
    ap.add_argument("--margin", type=int, default=2)
    ap.add_argument("--out", type=Path, default=here / "bench_results" / "tv_weight")
    a = ap.parse_args(argv)
    for w in a.weights:
        if w != "derived" and not (w.startswith("x") and _is_float(w[1:])) and not _is_float(w):
            raise SystemExit(f"--weights {w}: write derived, xK (K times the derived weight) or a number")
    require_ct(a)
    a.out.mkdir(parents=True, exist_ok=True)
    case = case_for(a, a.views)
    prebuild_kernels()
    rows = []
    for grid in a.grids:
        derived = None
        wanted = list(a.weights)
        if any(w.startswith("x") for w in wanted) and "derived" not in wanted:
            wanted.insert(0, "derived")
        for w in sorted(wanted, key=lambda w: w != "derived"):
            weight = None if w == "derived" else float(w) if not w.startswith("x") else float(w[1:]) * derived
            row = run_one(case, grid, weight, a.iterations, a.out, a.score_py, a.margin)
            if w == "derived":
                derived = row["weight"]
            row.update(asked=w, of_derived=round(row["weight"] / derived, 3) if derived else None)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{case.name}: {a.iterations} iterations, scored with {rows[0]['scorer'] if rows else ''}; "
          f"d (rays' spacing at the isocentre) = {rows[0]['ray_spacing_mm'] if rows else float('nan'):.3f} mm")
    print(f"{'grid':10s} {'h / d':>6s} {'weight':>9s} {'x derived':>9s} {'PSNR3D':>7s} {'SSIM3D':>7s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['grid']:10s} {r['h_over_d']:6.2f} {r['weight']:9.5f} {r['of_derived'] or float('nan'):9.2f} "
              f"{r['psnr']:7.2f} {r['ssim']:7.4f} {r['seconds']:8.1f}")
    path = a.out / "results.json"
    path.write_text(json.dumps(dict(cpu_count=os.cpu_count(), load_average=os.getloadavg(), case=str(case),
                                    ct=a.ct.name, views=a.views, det=a.det, pitch=a.pitch, i0=a.i0,
                                    iterations=a.iterations, results=rows), indent=1))
    print(f"\nwrote {path}")


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
