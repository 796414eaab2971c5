#!/usr/bin/env python3
"""The default run as a user without a reference CT makes it: no --reference, the default grid.

A user who has only the projections gets the default grid (the box every view sees, at the detector
pitch; fov.default_grid), mostly air around the object. This benchmark runs our command line that
way on the team's abdomen case (RTK's Joseph projections, benchmarks/rtk_reference.py) in several
variants, e.g. without and with the object support carved from the projections (support.py) and
with a time limit, and scores every result in world coordinates against the ground truth with the
referee's score.py (`--margin 2`; our metrics when score.py is not there). It prints a table and
writes JSON: PSNR3D / SSIM3D, seconds, iterations per second, peak memory, the training grid and the
support's fraction, and the grid's ceiling (the ground truth itself on the output grid, scored the
same way: what the default grid allows at best, `grid_ceiling`).

    python benchmarks/bench_default_grid.py --views 25 --variants no-support support \
        --out bench_results/default_grid

Variants: `no-support` (the whole default box: before), `support` (the default: after),
`support-tN` (support and --time-limit N seconds), `no-support-tN`, and `-flat` after the support
part for no coarse-to-fine (`support-flat-t180`). `--nerf-args` adds CLI arguments
to every run (e.g. "--preset preview" for a quick look).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_nerf import PeakRSS, prebuild_kernels  # noqa: E402
from CTNeRFReconLib.metrics import score_volumes  # noqa: E402
from CTNeRFReconLib.volume_io import read_volume  # noqa: E402
from rtk_reference import add_case_options, case_for, require_ct  # noqa: E402


def variant_args(name: str) -> list[str]:
    """CLI arguments of a variant name: [no-]support[-flat][-tSECONDS] (flat: no coarse-to-fine)."""
    m = re.fullmatch(r"(no-support|support)(-flat)?(?:-t(\d+(?:\.\d*)?))?", name)
    if not m:
        raise SystemExit(f"variant '{name}': write support, no-support, support-flat, support-t300, no-support-t300")
    args = ["--no-support"] if m.group(1) == "no-support" else []
    if m.group(2):
        args += ["--no-coarse-to-fine"]
    if m.group(3):
        args += ["--time-limit", m.group(3)]
    return args


def referee_score(score_py: Path | None, reference: Path, volume: Path, margin: int) -> dict:
    """The referee's world-coordinate scores (score.py --margin), else ours (no margin)."""
    if score_py is not None and score_py.exists():
        out = subprocess.run([sys.executable, str(score_py), str(reference), str(volume), "--margin", str(margin)],
                             capture_output=True, text=True, check=True).stdout
        return dict(json.loads(out.strip().splitlines()[-1]), scorer=f"score.py --margin {margin}")
    s = score_volumes(read_volume(reference), read_volume(volume))
    return dict(psnr=round(float(s["psnr"]), 3), ssim=round(float(s["ssim"]), 4), scorer="CTNeRFReconLib.metrics")


def grid_ceiling(score_py: Path | None, reference: Path, volume: Path, margin: int, out: Path) -> dict:
    """The best score any reconstruction on `volume`'s grid can get: the ground truth itself resampled
    (trilinear) onto that grid and scored like a result. Why: the default grid is the box every view
    sees at the detector pitch; where the object is wider than that box (the 40-view slab at a 160 px
    detector: a 366 mm wide CT in a 341 mm field of view) the part outside is zero on it, and the
    scorer's resampling back to the reference grid blurs the rest. A score near the ceiling is as good
    as that grid allows."""
    import SimpleITK as sitk

    grid = sitk.ReadImage(str(volume))
    truth = sitk.Resample(sitk.ReadImage(str(reference)), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    path = out / "truth_on_output_grid.nrrd"
    sitk.WriteImage(truth, str(path))
    try:
        return referee_score(score_py, reference, path, margin)
    finally:
        path.unlink()


def projections_only(case: Path, out: Path) -> Path:
    """The case as a user has it: geometry and projections, no reference.nrrd beside them (a shipped
    ground truth would make its grid the output grid)."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("geometry.xml", "projections.mha"):
        link = data / name
        if not link.exists():
            link.symlink_to((case / name).resolve())
    return data


def run_variant(case: Path, name: str, out: Path, extra: list[str], score_py: Path | None, margin: int,
                curve_every: int) -> dict:
    run_dir = out / f"run_{name}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    data = projections_only(case, out)
    cmd = [sys.executable, "-m", "CTNeRFReconLib", "reconstruct", str(data), "--out", str(run_dir), "--method", "nerf",
           "--device", "cpu", *variant_args(name), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    mem = PeakRSS(proc.pid)
    curve, progress, failed = [], [], None
    for line in proc.stdout:
        ev = json.loads(line)
        if ev["event"] == "snapshot" and curve_every and ev["sequence"] % curve_every == 0:
            keep = out / f"{name}_snap_{ev['sequence']:04d}.nrrd"
            shutil.copyfile(ev["path"], keep)
            curve.append((round(time.perf_counter() - t0, 2), ev["iteration"], keep))
        elif ev["event"] == "progress" and ev.get("iteration") is not None and ev.get("loss") is not None:
            progress.append((ev["iteration"], ev.get("elapsed_s")))
        elif ev["event"] == "failed":
            failed = ev["message"]
    stderr = proc.stderr.read()
    proc.wait()
    seconds = time.perf_counter() - t0
    peak = mem.stop()
    if failed or proc.returncode:
        raise RuntimeError(f"{name} failed ({proc.returncode}): {failed or stderr[-2000:]}")
    run = json.loads((run_dir / "run.json").read_text())
    if run["grid"].get("source") != "field of view":
        raise RuntimeError(f"{name}: the output grid came from '{run['grid'].get('source')}', not the default grid")
    report = run.get("method_report") or {}
    support = report.get("support") or {}
    final = referee_score(score_py, case / "reference.nrrd", run_dir / "volume.nrrd", margin)
    ceiling = grid_ceiling(score_py, case / "reference.nrrd", run_dir / "volume.nrrd", margin, out)
    ref = read_volume(case / "reference.nrrd")
    points = []
    for t, it, path in curve:
        s = score_volumes(ref, read_volume(path))
        points.append(dict(seconds=t, iteration=it, psnr=round(float(s["psnr"]), 3), ssim=round(float(s["ssim"]), 4)))
        path.unlink()
    rate = progress[-1][0] / progress[-1][1] if len(progress) >= 2 and progress[-1][1] else None
    return dict(variant=name, args=variant_args(name) + extra, seconds=round(seconds, 2),
                method_seconds=run.get("elapsed_s"), iterations=run.get("iteration"),
                iterations_per_s=None if rate is None else round(rate, 3), peak_memory_mb=round(peak, 1),
                output_grid=run["grid"]["shape_xyz"], training_grid=support.get("training_grid_shape_xyz"),
                support_found=support.get("found"), support_fraction=support.get("fraction"),
                support_box_fraction=support.get("box_fraction"), support_reason=support.get("reason"),
                time_budget=report.get("time_budget"), psnr=final["psnr"], ssim=final["ssim"],
                scorer=final["scorer"], grid_ceiling=dict(psnr=ceiling["psnr"], ssim=ceiling["ssim"]), curve=points)


def main(argv=None):
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_options(ap)
    ap.add_argument("--views", type=int, default=25)
    ap.add_argument("--variants", nargs="+", default=["no-support", "support"])
    ap.add_argument("--nerf-args", default="", help="extra CLI arguments for every run")
    ap.add_argument("--score-py", type=Path, default=here.parent / "shared" / "bench" / "score.py",
                    help="the referee's scorer (default ../shared/bench/score.py; ours when absent)")
    ap.add_argument("--margin", type=int, default=2, help="score.py --margin (voxels inside the reference box)")
    ap.add_argument("--curve-every", type=int, default=0,
                    help="score every N-th snapshot for a PSNR-against-time curve (0: only the final volume)")
    ap.add_argument("--out", type=Path, default=here / "bench_results" / "default_grid")
    a = ap.parse_args(argv)
    require_ct(a)
    a.out.mkdir(parents=True, exist_ok=True)
    case = case_for(a, a.views)
    prebuild_kernels()
    rows = []
    for name in a.variants:
        row = run_variant(case, name, a.out, a.nerf_args.split(), a.score_py, a.margin, a.curve_every)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
        rows.append(row)
    print(f"\n{a.views} views, default grid (no --reference), scored with {rows[0]['scorer'] if rows else ''}")
    print(f"{'variant':18s} {'PSNR3D':>7s} {'SSIM3D':>7s} {'seconds':>8s} {'iters':>6s} {'it/s':>6s} {'peak MB':>8s} "
          f"{'training grid':>16s} {'support':>8s} {'grid ceiling':>14s}")
    for r in rows:
        ips = "" if r["iterations_per_s"] is None else f"{r['iterations_per_s']:.2f}"
        tg = "x".join(str(v) for v in (r["training_grid"] or r["output_grid"]))
        frac = "" if r["support_fraction"] is None else f"{100 * r['support_fraction']:.0f} %"
        print(f"{r['variant']:18s} {r['psnr']:7.2f} {r['ssim']:7.3f} {r['seconds']:8.1f} {r['iterations'] or 0:6d} "
              f"{ips:>6s} {r['peak_memory_mb']:8.0f} {tg:>16s} {frac:>8s} "
              f"{r['grid_ceiling']['psnr']:7.2f}/{r['grid_ceiling']['ssim']:.3f}")
    path = a.out / "results.json"
    path.write_text(json.dumps(dict(cpu_count=os.cpu_count(), load_average=os.getloadavg(), ct=a.ct.name,
                                    views=a.views, det=a.det, pitch=a.pitch, i0=a.i0, case=str(case),
                                    nerf_args=a.nerf_args, results=rows), indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
