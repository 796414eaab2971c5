"""The commands that use a run's continuous field: `export`, `surface`, `check` (see cli.py).

    export RUN_DIR [--roi CX CY CZ SX SY SZ] [--spacing MM] --out FILE.nrrd [--overwrite]
    surface RUN_DIR --threshold auto|MU|NHU|bone|skin [--spacing MM] [--roi ...] --out FILE.vtp|.stl|.obj
    check RUN_DIR [--view N] [--out FILE.png] [--field]

Every input is checked before any work; a refusal reads `FILE: field 'FIELD': problem. Fix: ...`
(exit code 2). Boxes are centre and size in mm in the scanner frame, as volume.nrrd's geometry.
"""
from __future__ import annotations

import json
from pathlib import Path

from .phantom import MU_WATER
from .surface import DECIMATE, SMOOTH_ITERATIONS


def _common(p, out_help: str):
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder written by `reconstruct` "
                   "(finished, cancelled or still running)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help=out_help)
    p.add_argument("--roi", type=float, nargs=6, metavar=("CX", "CY", "CZ", "SX", "SY", "SZ"),
                   help="box centre and size in mm, scanner frame (default: the run's output box)")
    p.add_argument("--spacing", type=float, metavar="MM", help="voxel size in mm (default: the output grid's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where the field is evaluated")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_parsers(sub):
    p = sub.add_parser("export", help="evaluate a run's field in any box at any voxel size (no retraining)",
                       description="Evaluate the trained field of RUN_DIR (its checkpoint.pt) on a new grid and "
                                   "write it like volume.nrrd (1/mm, scanner frame). A run without a checkpoint "
                                   "(FDK) is resampled from its volume.nrrd instead, and the command says so.")
    _common(p, "volume file to write (.nrrd, .mha, .nii, .nii.gz)")
    p = sub.add_parser("surface", help="a closed iso-surface model of a run (.vtp, .stl, .obj, in mm)",
                       description="Extract a closed, smoothed, decimated iso-surface of RUN_DIR's field (or its "
                                   "volume.nrrd when it has no checkpoint), in the scanner frame in mm.")
    _common(p, "surface file to write (.vtp, .stl, .obj)")
    p.add_argument("--threshold", default="auto", metavar="T",
                   help="auto (Otsu inside the object's support), an attenuation in 1/mm (0.026), Hounsfield "
                        f"units (300HU), bone (+300 HU) or skin (-500 HU); HU use mu_water {MU_WATER} /mm")
    p.add_argument("--smooth", type=int, default=SMOOTH_ITERATIONS, metavar="N",
                   help=f"windowed-sinc smoothing iterations (0: none; default {SMOOTH_ITERATIONS}: light, since a "
                        "field's iso-surface is already sub-voxel and smoothing thins shells)")
    p.add_argument("--decimate", type=float, default=DECIMATE, metavar="F",
                   help=f"fraction of the triangles to remove, in [0, 1) (default {DECIMATE}; topology kept, an error "
                        "bound of a quarter voxel)")
    p = sub.add_parser("check", help="rendered against measured projections of a run (projection_check.png)",
                       description="Forward-project RUN_DIR's volume through every view, plot the residual (RMSE) "
                                   "per view over the angle and show one view measured, rendered and their "
                                   "difference; writes RUN_DIR/projection_check.png unless --out says otherwise.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--view", type=int, metavar="N", help="view to show (default: the one with the largest residual)")
    p.add_argument("--out", type=Path, metavar="FILE.png", help="picture to write (default RUN_DIR/projection_check.png)")
    p.add_argument("--field", action="store_true", help="render the trained field (checkpoint) rather than volume.nrrd")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _device(name: str) -> str:
    from .worker import resolve_device

    return resolve_device(name)


def _print(args, result: dict, line: str):
    if getattr(args, "json", False):
        from .events import to_json_value

        # one line: a client reading the command's stdout (the Slicer panel) takes it whole
        print(json.dumps(to_json_value(result), separators=(",", ":")), flush=True)
    else:
        print(line)


def _say(args):
    import sys

    return (lambda text: None) if getattr(args, "json", False) else (lambda text: print(text, file=sys.stderr))


def _export(args) -> int:
    from .field_export import export_region

    roi = args.roi
    res = export_region(args.run_dir, args.out, None if roi is None else roi[:3], None if roi is None else roi[3:],
                        args.spacing, overwrite=args.overwrite, device=_device(args.device), on_message=_say(args))
    g = res["grid"]
    _print(args, res, f"wrote {res['path']}: {g['shape_xyz']} voxels of {g['spacing_xyz'][0]:.4g} mm from "
                      f"{res['note']} in {res['seconds']['total']:.2f} s")
    return 0


def _surface(args) -> int:
    from .surface import run_surface

    if not (0.0 <= args.decimate < 1.0):
        from .formats.validate import ScanFormatError

        raise ScanFormatError("--decimate", "--decimate", f"is {args.decimate}", "give a fraction in [0, 1)")
    if args.smooth < 0:
        from .formats.validate import ScanFormatError

        raise ScanFormatError("--smooth", "--smooth", f"is {args.smooth}", "give 0 (no smoothing) or more iterations")
    roi = args.roi
    res = run_surface(args.run_dir, args.out, args.threshold, args.spacing, None if roi is None else roi[:3],
                      None if roi is None else roi[3:], overwrite=args.overwrite, device=_device(args.device),
                      smooth_iterations=args.smooth, decimate=args.decimate, on_message=_say(args))
    _print(args, res, f"wrote {res['path']}: {res['triangles']} triangles, area {res['area_mm2']:.1f} mm^2, "
                      f"enclosed {res['volume_mm3'] / 1000:.2f} cm^3, threshold {res['threshold']:.4g} /mm "
                      f"({res['hu']:.0f} HU, {res['threshold_from']}), scanner frame (mm)")
    return 0


def _check(args) -> int:
    from .projection_check import check_run

    res = check_run(args.run_dir, view=args.view, out=args.out, device=_device(args.device), use_field=args.field,
                    on_message=_say(args))
    _print(args, res, f"wrote {res['path']}: view {res['view']} at {res['angle_deg']:.1f} deg, RMSE "
                      f"{res['rmse'][res['view']]:.4g}; median over views {res['median_rmse']:.4g}, largest "
                      f"{res['worst_ratio']:.1f} x the median (view {res['worst_view']})")
    return 0


COMMANDS = {"export": _export, "surface": _surface, "check": _check}
