"""The tuned RTK ADMM-TV on the grid our default run trains on, and what a grid costs the truth itself.

The benchmark's peers reconstruct on the referee's reference grid: the grid the case's projections were
computed from (make_rtk_case.py projects the CT resampled to 3 mm). That grid is a model of the data with
no discretisation error (the "inverse crime"), and a user without the ground truth cannot choose it. Our
default run writes volume.nrrd on the detector pitch at the isocentre and score.py resamples it onto the
reference grid. To compare like with like, this script runs RTK's ADMM-TV (itk-rtk, the referee's
peer) on the box and voxel our run trained on (its carved support box, from RUN_DIR/run.json), at the
settings given (tune them: the same alpha / beta sweep as the referee's rtk_sweep.py, chosen with the
ground truth), and scores every volume with the referee's score.py `--margin 2`.

It also scores the ground truth sampled onto each grid (trilinear, as score.py resamples) and
scored back: what a perfect reconstruction written on that grid scores (`ceiling` rows). It bounds
samples of the attenuation, not every volume: values tailored to the scorer's interpolation could score
higher. Those rows need no RTK and take seconds.

    python benchmarks/bench_peer_same_grid.py CASE RUN_DIR --admm 1:1000:30 0.25:1000:30 \
        --out benchmarks/results/peers_same_grid/CASE.json

CASE holds geometry.xml, projections.mha and reference.nrrd (make_rtk_case.py); RUN_DIR is one of our
runs on CASE's geometry.xml and projections.mha without the reference (the default grid). `--admm
ALPHA:BETA:AL` runs ADMM-TV with 3 CG iterations per AL iteration, as the referee's sweep does; each is
timed (the filter's Update() alone) and written to a temporary folder, then deleted after scoring; a
setting RTK refuses is kept as a row with its error. The JSON is rewritten after every row.
Run it niced beside other work: the seconds are then upper bounds, and the JSON records the load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_peers_tuned import BENCH, load_score  # noqa: E402
from rtk_reference import read_rtk_scan  # noqa: E402


def referee_score(score_py: Path):
    """score(reference, volume, ..., margin) from the referee's score.py (imported, not copied), or a
    SystemExit naming the file when it is not beside the project."""
    if not score_py.exists():
        raise SystemExit(f"{score_py}: the referee's score.py is not there; pass --score")
    return load_score(score_py)


def grids_of_run(run_dir: Path) -> dict:
    """{name: (size_xyz, spacing_xyz, origin_xyz)} of the run's output grid and its training box.

    The training box is the carved support's box (`method_report.support`, faces in mm) tiled by the
    training grid's voxel counts; a run without a carved support has only the output grid."""
    run_json = run_dir / "run.json"
    if not run_json.exists():
        raise SystemExit(f"{run_json}: not found; RUN_DIR must be a finished `reconstruct` run")
    run = json.loads(run_json.read_text())
    g = run["grid"]
    grids = {"output": (list(g["shape_xyz"]), list(g["spacing_xyz"]), list(g["origin_xyz"]))}
    if any(abs(d - (1.0 if i == j else 0.0)) > 1e-9 for i, row in enumerate(g["direction"]) for j, d in enumerate(row)):
        raise SystemExit(f"{run_json}: grid.direction is not the identity; this script places RTK grids axis-aligned")
    sup = (run.get("method_report") or {}).get("support") or {}
    if sup.get("found") and sup.get("training_grid_shape_xyz") == sup.get("box_shape_xyz"):
        lo, hi = np.asarray(sup["box_lo_mm"], float), np.asarray(sup["box_hi_mm"], float)
        n = np.asarray(sup["training_grid_shape_xyz"], int)
        sp = (hi - lo) / n
        grids["training"] = (n.tolist(), sp.tolist(), (lo + sp / 2).tolist())
    return grids


def truth_on(reference: Path, grid, out: Path) -> None:
    """The ground truth resampled (trilinear, zero outside) onto `grid`, written to `out`."""
    size, spacing, origin = grid
    target = sitk.Image([int(k) for k in size], sitk.sitkFloat32)
    target.SetSpacing([float(s) for s in spacing])
    target.SetOrigin([float(o) for o in origin])
    ref = sitk.ReadImage(str(reference), sitk.sitkFloat32)
    sitk.WriteImage(sitk.Resample(ref, target, sitk.Transform(), sitk.sitkLinear, 0.0), str(out))


def admm_on(scan, grid, alpha: float, beta: float, al: int, out: Path) -> float:
    """RTK ADMM-TV (3 CG iterations per AL iteration) on `grid` from `scan` (rtk_reference.read_rtk_scan's
    itk, RTK, geometry, projections); the volume to `out`; seconds of Update()."""
    itk, rtk, geometry, projections = scan
    f3 = itk.Image[itk.F, 3]
    size, spacing, origin = grid
    source = rtk.ConstantImageSource[f3].New()
    source.SetSize([int(k) for k in size])
    source.SetSpacing([float(s) for s in spacing])
    source.SetOrigin([float(o) for o in origin])
    source.SetConstant(0.0)
    source.Update()
    admm = rtk.ADMMTotalVariationConeBeamReconstructionFilter[f3].New()
    admm.SetInput(0, source.GetOutput())
    admm.SetInput(1, projections)
    admm.SetGeometry(geometry)
    admm.SetAlpha(alpha)
    admm.SetBeta(beta)
    admm.SetAL_iterations(al)
    admm.SetCG_iterations(3)
    t0 = time.perf_counter()
    admm.Update()
    seconds = time.perf_counter() - t0
    itk.imwrite(admm.GetOutput(), str(out))
    return seconds


def parse_admm(text: str) -> tuple[float, float, int]:
    try:
        alpha, beta, al = text.split(":")
        return float(alpha), float(beta), int(al)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--admm {text!r}: give ALPHA:BETA:AL, e.g. 1:1000:30") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", type=Path, help="an RTK case folder (geometry.xml, projections.mha, reference.nrrd)")
    ap.add_argument("run", type=Path, help="our run on the case's data without the reference (its run.json)")
    ap.add_argument("--admm", type=parse_admm, nargs="*", default=[], metavar="ALPHA:BETA:AL",
                    help="ADMM-TV settings to run on the training box")
    ap.add_argument("--grid", choices=("training", "output"), default="training",
                    help="the grid ADMM-TV runs on (default: the run's training box)")
    ap.add_argument("--margin", type=int, default=2)
    ap.add_argument("--score", type=Path, default=BENCH / "score.py", help="the referee's score.py")
    ap.add_argument("--out", type=Path, help="JSON file to write (refused if it exists)")
    args = ap.parse_args(argv)
    reference = args.case / "reference.nrrd"
    for needed in (reference, args.case / "geometry.xml", args.case / "projections.mha"):
        if not needed.exists():
            raise SystemExit(f"{needed}: not found; CASE must be a make_rtk_case.py folder")
    if args.out is not None and args.out.exists():
        raise SystemExit(f"{args.out}: exists; choose another --out (results are never overwritten)")
    score = referee_score(args.score)
    grids = grids_of_run(args.run)
    if args.grid not in grids:
        raise SystemExit(f"{args.run / 'run.json'}: no training box recorded (no support carved, or a box "
                         f"extended past the support); use --grid output")
    ours = args.run / "volume.nrrd"
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="peer_same_grid_"))

    def save() -> None:
        """The rows so far to --out, atomically: a sweep of hours keeps what it measured if it stops."""
        if args.out is None:
            return
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = dict(case=str(args.case), run=str(args.run), margin=args.margin, grids=grids, rows=rows,
                      argv=sys.argv, cpu_count=os.cpu_count(), nice=os.nice(0))
        part = args.out.with_name(args.out.name + ".part")
        part.write_text(json.dumps(result, indent=1))
        part.replace(args.out)

    def add(row: dict, volume: Path | None) -> None:
        if volume is not None:
            row.update(score(str(reference), str(volume), margin=args.margin))
        row["load_avg"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        save()
        if "error" in row:
            print(f"{row['what']:52s} FAILED: {row['error']}", flush=True)
        else:
            print(f"{row['what']:52s} {row['psnr']:7.2f} {row['ssim']:7.4f} {row.get('seconds') or '':>8}", flush=True)

    print(f"{'volume (score.py --margin ' + str(args.margin) + ')':52s} {'PSNR3D':>7s} {'SSIM3D':>7s} {'seconds':>8s}")
    try:
        if ours.exists():
            add(dict(what=f"ours: {ours}", kind="ours"), ours)
        for name, grid in grids.items():
            path = tmp / f"truth_{name}.nrrd"
            truth_on(reference, grid, path)
            add(dict(what=f"ceiling: the truth on the {name} grid {grid[0]}", kind="ceiling", grid=name,
                     size=grid[0], spacing=grid[1], origin=grid[2]), path)
        scan = read_rtk_scan(args.case) if args.admm else None  # read once for the whole sweep
        for alpha, beta, al in args.admm:
            path = tmp / f"admm_{alpha:g}_{beta:g}_{al}.nrrd"
            row = dict(what=f"RTK ADMM-TV alpha {alpha:g} beta {beta:g} {al} AL, {args.grid} grid", kind="admm-tv",
                       grid=args.grid, alpha=alpha, beta=beta, al=al)
            try:
                row["seconds"] = round(admm_on(scan, grids[args.grid], alpha, beta, al, path), 1)
            except RuntimeError as exc:  # RTK's ADMM-TV throws on grids wider than the field of view (README)
                add(dict(row, error=" ".join(str(exc).strip().splitlines()[-3:])), None)
                continue
            add(row, path)
            path.unlink()
    finally:
        for p in tmp.glob("*"):
            p.unlink()
        tmp.rmdir()
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
