#!/usr/bin/env python3
"""A displaced (offset, half-fan) detector on a full orbit: the default grid and both methods, as a user
runs them, against the ground truth.

Many cone-beam scanners widen their field of view by shifting the flat panel sideways and rotating a
full turn (radiotherapy on-board imagers' half-fan mode, large-field C-arms, micro-CT): every view then
sees only a small circle about the axis, but every line through the circle the panel's far edge reaches
is measured once, from one side of the orbit or the other. This script makes such a scan from an RTK
case made by rtk_reference.py (the whole object on the detector) by keeping only the columns from
`--first-col` on (`--cols` of them): the projections' origin follows the crop, so the detector sits off
its principal point. Each variant runs a command line (this checkout's, or `--before`'s, an older
checkout) on that scan with the default grid, or, on this checkout's default grid, our FDK without its
weights or RTK's FDK after its own displaced-detector weighting (itk-rtk's DisplacedDetectorImageFilter,
the independent reference). Each is scored with the referee's score.py (`--margin 2`) twice: against the truth cut to the region the scan measures (the whole circle; what a variant's grid
leaves out counts as zero there) and against the truth cut to the box every view sees. Also the RMS
error inside the circle every view sees and in the ring between it and the measured circle. Prints a
table, writes JSON and the middle slices of each run against the truth.

    python benchmarks/bench_displaced_detector.py --case ~/.cache/ctnerf_bench/abdomen_scaled08_40v_det200_p3.2 \\
        --first-col 70 --cols 130 --before /path/to/older/checkout --out bench_results/displaced
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_default_grid import referee_score  # noqa: E402
from bench_lateral_cut import cut_reference  # noqa: E402
from bench_nerf import prebuild_kernels  # noqa: E402
from error_breakdown import on_reference_grid, slices_png  # noqa: E402


def fdk_unweighted(data: Path, grid, out: Path) -> float:
    """Seconds of our FDK without the displaced detector's weights (FDKConfig.displaced_weights, a
    library setting the command line does not offer), written to out/volume.nrrd."""
    from CTNeRFReconLib.fdk import FDKConfig, fdk
    from CTNeRFReconLib.formats import load_scan
    from CTNeRFReconLib.volume_io import write_volume

    scan = load_scan(data)
    t0 = time.perf_counter()
    volume = fdk(scan, grid, FDKConfig(displaced_weights=False))
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    write_volume(volume, out / "volume.nrrd")
    return seconds


def rtk_fdk(data: Path, grid, out: Path) -> float:
    """Seconds of RTK's displaced-detector FDK of `data` onto `grid` (a VolumeGrid), written to out/volume.nrrd."""
    from rtk_reference import read_rtk_scan

    itk, rtk, geometry, projections = read_rtk_scan(data)
    image = itk.Image[itk.F, 3]
    source = rtk.ConstantImageSource[image].New()
    source.SetOrigin([float(v) for v in grid.origin_xyz])
    source.SetSpacing([float(v) for v in grid.spacing_xyz])
    source.SetSize([int(v) for v in grid.shape_xyz])
    source.SetConstant(0.0)
    t0 = time.perf_counter()
    displaced = rtk.DisplacedDetectorImageFilter[image].New()
    displaced.SetInput(projections)
    displaced.SetGeometry(geometry)
    fdk = rtk.FDKConeBeamReconstructionFilter[image].New()
    fdk.SetInput(0, source.GetOutput())
    fdk.SetInput(1, displaced.GetOutput())
    fdk.SetGeometry(geometry)
    fdk.Update()
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    itk.imwrite(fdk.GetOutput(), str(out / "volume.nrrd"))
    return seconds


def displaced_case(case: Path, first: int, cols: int, out: Path) -> Path:
    """The case's columns first .. first + cols - 1 as a scan folder (geometry.xml unchanged)."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    proj = sitk.ReadImage(str(case / "projections.mha"))
    n_cols = proj.GetSize()[0]
    if not (0 <= first and 0 < cols and first + cols <= n_cols):
        raise SystemExit(f"--first-col {first} --cols {cols} leave the case's {n_cols} columns")
    sitk.WriteImage(proj[first:first + cols, :, :], str(data / "projections.mha"))  # the origin follows the crop
    shutil.copy(case / "geometry.xml", data / "geometry.xml")
    return data


VARIANTS = {"nerf": ["--method", "nerf"], "fdk": ["--method", "fdk"],
            "fdk-ram-lak": ["--method", "fdk", "--fdk-filter", "ram-lak"], "fdk-unweighted": fdk_unweighted,
            "rtk-fdk": rtk_fdk}
"""Our command line's arguments, or a function run here on this checkout's default grid: our FDK without
the weights, and RTK's FDK after its DisplacedDetectorImageFilter (Wang's weights on the projections,
its ram-lak filter: compare with fdk-ram-lak), the independent reference."""


def zone_rms(reference: Path, volume: Path, axis: int, near: float, far: float) -> dict:
    """RMS error (1/mm) inside the circle every view sees (radius `near`) and in the ring out to `far`."""
    ref = sitk.ReadImage(str(reference), sitk.sitkFloat32)
    truth = sitk.GetArrayFromImage(ref)
    ours = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(volume), sitk.sitkFloat32), ref,
                                                sitk.Transform(), sitk.sitkLinear, 0.0))
    coords = np.meshgrid(*[ref.GetOrigin()[a] + ref.GetSpacing()[a] * np.arange(ref.GetSize()[a])
                           for a in (2, 1, 0)], indexing="ij")
    r = np.hypot(*[coords[2 - a] for a in range(3) if a != axis])
    zones = {"every view": r < near, "ring": (r >= near) & (r < far)}
    return {name: float(np.sqrt(np.mean((ours - truth)[sel] ** 2))) for name, sel in zones.items() if sel.any()}


def run(tree: Path, data: Path, out: Path, extra: list[str], time_limit: float) -> tuple[float, dict]:
    """(seconds, run.json) of `tree`'s command line on `data`."""
    budget = ["--time-limit", f"{time_limit:g}"] if "nerf" in extra else []  # FDK has no budget to set
    cmd = [sys.executable, "-m", "CTNeRFReconLib", "reconstruct", str(data), "--out", str(out), "--overwrite",
           *budget, "--quiet", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=tree)
    return time.perf_counter() - t0, json.loads((out / "run.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", type=Path, required=True, help="an RTK case folder (rtk_reference.py)")
    ap.add_argument("--first-col", type=int, required=True, help="first detector column kept")
    ap.add_argument("--cols", type=int, required=True, help="detector columns kept")
    ap.add_argument("--variants", nargs="+", default=["nerf", "fdk", "fdk-ram-lak", "fdk-unweighted", "rtk-fdk"], choices=sorted(VARIANTS))
    ap.add_argument("--before", type=Path, help="an older checkout: its nerf and fdk run too, as `before-...`")
    ap.add_argument("--time-limit", type=float, default=180.0)
    ap.add_argument("--score-py", type=Path, default=ROOT.parent / "shared" / "bench" / "score.py")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not args.score_py.exists():
        raise SystemExit(f"the referee's score.py is not at {args.score_py}: pass --score-py")
    case = args.case.expanduser()
    args.out.mkdir(parents=True, exist_ok=True)
    data = displaced_case(case, args.first_col, args.cols, args.out)

    from CTNeRFReconLib.axial_extension import detector_axis
    from CTNeRFReconLib.formats import load_scan
    from CTNeRFReconLib.fov import common_fov_bounds, default_grid
    from CTNeRFReconLib.orbit import displaced_detector

    geometry = load_scan(data).geometry
    axis = detector_axis(geometry)[0]
    measured, every = default_grid(geometry).bounds(), common_fov_bounds(geometry)
    plane = [a for a in range(3) if a != axis]
    far = float(min(measured[1][a] - measured[0][a] for a in plane)) / 2
    near = float(min(every[1][a] - every[0][a] for a in plane)) / 2
    displaced = displaced_detector(geometry)
    truths = {"measured": cut_reference(case, *measured, axis, args.out / "reference_measured.nrrd"),
              "every view": cut_reference(case, *every, axis, args.out / "reference_every_view.nrrd")}
    runs = [(name, ROOT, VARIANTS[name]) for name in args.variants]
    if args.before is not None:
        runs += [(f"before-{name}", args.before.resolve(), VARIANTS[name]) for name in ("nerf", "fdk")]
    prebuild_kernels()
    rows = []
    for name, tree, extra in runs:
        folder = args.out / f"run_{name}"
        volume = folder / "volume.nrrd"
        if callable(extra):  # run here, on this checkout's default grid
            grid = default_grid(geometry)
            row = dict(variant=name, tree=extra.__name__, args=[], seconds=round(extra(data, grid, folder), 1),
                       output_grid=list(grid.shape_xyz), iterations=None, notes=[], support=None)
        else:
            seconds, record = run(tree, data, folder, extra, args.time_limit)
            report = record.get("method_report") or {}
            row = dict(variant=name, tree=str(tree), args=extra, seconds=round(seconds, 1),
                       output_grid=record["grid"]["shape_xyz"],
                       iterations=(report.get("time_budget") or {}).get("iterations_done"),
                       notes=[n for line in (folder / "events.jsonl").read_text().splitlines()
                              for n in (json.loads(line).get("notes") or [])],
                       support=report.get("support"))
        for label, truth in truths.items():
            score = referee_score(args.score_py, truth, volume, margin=2)
            row[label] = {"psnr": score["psnr"], "ssim": score["ssim"]}
        row["rms"] = zone_rms(truths["measured"], volume, axis, near, far)
        rows.append(row)
        slices_png(*on_reference_grid(truths["measured"], volume), args.out / f"slices_{name}.png")
    print(f"{case.name}, columns {args.first_col} to {args.first_col + args.cols - 1} of the detector"
          + (f" ({float(np.median(np.abs(displaced.offsets))):.0f} mm off its principal point)" if displaced else
             " (not a displaced detector on a closed orbit)")
          + f": every view sees radius {near:.0f} mm, the scan measures radius {far:.0f} mm; "
          + f"--time-limit {args.time_limit:g}, score.py --margin 2")
    print(f"{'variant':16s} {'measured circle':>16s} {'every-view box':>16s} {'iters':>6s} {'seconds':>8s}  "
          "RMS x1e3: every view / ring")
    for r in rows:
        m, e = r["measured"], r["every view"]
        print(f"{r['variant']:16s} {m['psnr']:8.2f} {m['ssim']:7.3f} {e['psnr']:8.2f} {e['ssim']:7.3f} "
              f"{r['iterations'] if r['iterations'] is not None else '-':>6} {r['seconds']:8.1f}  "
              + " / ".join(f"{1e3 * r['rms'][k]:.2f}" if k in r["rms"] else "-" for k in ("every view", "ring")))
    result = dict(case=str(case), first_col=args.first_col, cols=args.cols, every_view_radius_mm=near,
                  measured_radius_mm=far, time_limit_s=args.time_limit, cpu_count=os.cpu_count(),
                  load_average=list(os.getloadavg()), scorer="score.py --margin 2", results=rows)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
