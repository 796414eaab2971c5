#!/usr/bin/env python3
"""An object wider than the field of view, as on a C-arm or a small flat panel: the default run with and
without training past the field of view's sides (CTNeRFReconLib/lateral_extension.py).

Takes an RTK case made by rtk_reference.py (the whole object on the detector) and keeps only the middle
`--cols` columns of its projections (`--cols 0`: the case as it is), so the object goes on past the
detector's left and right edges (`--rows N` also keeps only the middle rows: a body longer than the
detector as well). Each variant runs our command line on that scan without a reference
(the default grid: the box every view sees, narrower than the object) and is scored with the
referee's score.py (`--margin 2`) against the ground truth cut to the default grid's in-plane extent
(what lies outside it is not in the output), and by the RMS error in rings of the distance from the
rotation axis over the field of view's radius (the truncation's error sits near the edge). Prints a
table, writes JSON and, per variant, the middle slices of the truth, the run and their difference
(`slices_VARIANT.png`, in error_breakdown.py's soft-tissue window).

    python benchmarks/bench_lateral_cut.py --case ~/.cache/ctnerf_bench/abdomen_scaled08_40v_det200_p3.2 \\
        --cols 120 --variants default no-widening --time-limit 180 --out bench_results/lateral_cut

Variants: `default` (as far as the edge rays say the object goes); `no-widening` (`--setting
extend_cut_sides=false`: the box ends at the field of view, as before 2026-12-06); `0.15`, `0.25`, `0.4` and
`0.5` (`cut_sides_fraction`: that fraction of the box's in-plane half-side, whatever the data say);
`plain-tv` (`--setting tv_edge_when_truncated=false`: plain TV on truncated projections, the default before
2026-12-07);
`table-sides` (`--setting widen_reached_sides=true`: at least 0.4 of the half-side past the sides the support
reaches that the edge rays do not widen, whatever the data say); `no-thin` (`--setting
measure_thin_sides=false`: not past those sides at all, the default before the ninth round of 2026-12-06; by
default they are widened as far as the mass the cut views miss says a table top goes on).
A patient-like case with a table: `make_table_ct.py`.
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

from bench_axial_cut import add_common_arguments, parse_checked, run_row  # noqa: E402
from bench_default_grid import referee_score  # noqa: E402
from bench_nerf import prebuild_kernels  # noqa: E402
from error_breakdown import on_reference_grid, slices_png  # noqa: E402

VARIANTS = {"default": [], "no-widening": ["--setting", "extend_cut_sides=false"],
            "0.15": ["--setting", "cut_sides_fraction=0.15"], "0.25": ["--setting", "cut_sides_fraction=0.25"],
            "0.4": ["--setting", "cut_sides_fraction=0.4"], "0.5": ["--setting", "cut_sides_fraction=0.5"],
            "plain-tv": ["--setting", "tv_edge_when_truncated=false"],
            "table-sides": ["--setting", "widen_reached_sides=true"],
            "no-thin": ["--setting", "measure_thin_sides=false"]}
RINGS = {"r<0.5": (0.0, 0.5), "0.5-0.8": (0.5, 0.8), "0.8-1": (0.8, 1.0), "box corners": (1.0, np.inf)}
"""Rings of the in-plane distance from the rotation axis over the field of view's radius."""


def cut_case(case: Path, cols: int, out: Path, rows: int = 0):
    """(data folder, reference cut to the default grid in-plane, the field of view's radius in mm, the
    rotation axis's world axis): the case's middle `cols` columns, and its middle `rows` rows when
    given (the reference then cut to the grid's extent along the axis too, as bench_axial_cut.py does)."""
    from CTNeRFReconLib.axial_extension import detector_axis
    from CTNeRFReconLib.fov import default_grid
    from CTNeRFReconLib.formats import load_scan

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    proj = sitk.ReadImage(str(case / "projections.mha"))
    n_cols = proj.GetSize()[0]
    if cols and not 0 < cols < n_cols:
        raise SystemExit(f"--cols must be between 1 and the case's {n_cols} columns (or 0), got {cols}")
    n_rows = proj.GetSize()[1]
    if rows and not 0 < rows < n_rows:
        raise SystemExit(f"--rows must be between 1 and the case's {n_rows} rows (or 0), got {rows}")
    first = (n_cols - cols) // 2 if cols else 0
    first_row = (n_rows - rows) // 2 if rows else 0
    sitk.WriteImage(proj[first:first + (cols or n_cols), first_row:first_row + (rows or n_rows), :],
                    str(data / "projections.mha"))  # the origin follows the crop
    shutil.copy(case / "geometry.xml", data / "geometry.xml")
    geometry = load_scan(data).geometry
    grid = default_grid(geometry)
    axis = detector_axis(geometry)[0]
    lo, hi = grid.bounds()
    cut = cut_reference(case, lo, hi, None if rows else axis, out / "reference_cut.nrrd")
    radius = float(min(hi[a] - lo[a] for a in range(3) if a != axis)) / 2.0
    return data, cut, radius, axis


def cut_reference(case: Path, lo, hi, whole_axis: int | None, path: Path) -> Path:
    """The case's reference cut to the box (lo, hi), all of it along `whole_axis` (None: cut along every
    axis), written to `path`."""
    ref = sitk.ReadImage(str(case / "reference.nrrd"))
    index = []
    for a in range(3):
        w = ref.GetOrigin()[a] + ref.GetSpacing()[a] * np.arange(ref.GetSize()[a])
        keep = np.arange(len(w)) if a == whole_axis else np.nonzero((w >= lo[a]) & (w <= hi[a]))[0]
        index.append(slice(int(keep[0]), int(keep[-1]) + 1))
    sitk.WriteImage(ref[index[0], index[1], index[2]], str(path))
    return path


def score(score_py: Path, reference: Path, volume: Path, radius: float, axis: int) -> dict:
    """score.py --margin 2, and the RMS error (1/mm) by ring of the distance from the axis."""
    out = referee_score(score_py, reference, volume, margin=2)
    ref = sitk.ReadImage(str(reference), sitk.sitkFloat32)
    truth = sitk.GetArrayFromImage(ref)
    ours = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(volume), sitk.sitkFloat32), ref,
                                                sitk.Transform(), sitk.sitkLinear, 0.0))
    coords = np.meshgrid(*[ref.GetOrigin()[a] + ref.GetSpacing()[a] * np.arange(ref.GetSize()[a])
                           for a in (2, 1, 0)], indexing="ij")  # (z, y, x) arrays of world x, y, z
    planar = [coords[2 - a] for a in range(3) if a != axis]
    r = np.hypot(*planar) / radius
    rms = {name: float(np.sqrt(np.mean((ours - truth)[(r >= a) & (r < b)] ** 2))) for name, (a, b) in RINGS.items()
           if np.any((r >= a) & (r < b))}
    return {"psnr": out["psnr"], "ssim": out["ssim"], "scorer": out["scorer"], "rms": rms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", type=Path, required=True, help="an RTK case folder (rtk_reference.py)")
    ap.add_argument("--cols", type=int, required=True, help="detector columns kept (the middle ones; 0: all)")
    ap.add_argument("--rows", type=int, default=0, help="detector rows kept too (the middle ones; 0: all): "
                    "a body both wider than the field of view and longer than the detector")
    ap.add_argument("--variants", nargs="+", default=["default", "no-widening"], choices=sorted(VARIANTS))
    add_common_arguments(ap)
    args = parse_checked(ap)
    data, reference, radius, axis = cut_case(args.case.expanduser(), args.cols, args.out, args.rows)
    prebuild_kernels()
    rows = []
    for name in args.variants:
        row, run = run_row(data, args, name, VARIANTS[name])
        rows.append(dict(row, **score(args.score_py, reference, run / "volume.nrrd", radius, axis)))
        slices_png(*on_reference_grid(reference, run / "volume.nrrd"), args.out / f"slices_{name}.png")
    print(f"{args.case.name}, " + (f"middle {args.cols} columns" if args.cols else "all columns")
          + (f" and {args.rows} rows" if args.rows else "")
          + f" (field of view radius {radius:.1f} mm), default grid, "
          + (f"{args.iterations} iterations" if args.iterations else f"--time-limit {args.time_limit:g}")
          + ", score.py --margin 2 on the truth cut to the grid")
    print(f"{'variant':12s} {'PSNR3D':>7s} {'SSIM3D':>7s} {'iters':>6s} {'seconds':>8s}  {'training grid':>14s}  "
          f"{'past the faces (mm)':>30s}  RMS x1e3 by ring of r / radius: " + " / ".join(RINGS))
    for r in rows:
        wide = "-" if not r["widened"] else " ".join(f"{f}{v['mm']:g}" for f, v in r["widened"]["faces"].items())
        print(f"{r['variant']:12s} {r['psnr']:7.2f} {r['ssim']:7.3f} {r['iterations']:6d} {r['seconds']:8.1f}  "
              f"{'x'.join(map(str, r['training_grid'] or [])):>14s}  {wide:>30s}  "
              + " / ".join(f"{1e3 * r['rms'][k]:.2f}" if k in r["rms"] else "-" for k in RINGS))
    result = dict(case=str(args.case), cols=args.cols, rows=args.rows, fov_radius_mm=radius, time_limit_s=None if args.iterations
                  else args.time_limit, iterations=args.iterations, cpu_count=os.cpu_count(),
                  load_average=list(os.getloadavg()), scorer="score.py --margin 2", results=rows)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
