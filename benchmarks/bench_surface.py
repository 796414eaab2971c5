"""Surface of a run against the ground truth's surface at the same threshold (issue 14's figure).

    python benchmarks/bench_surface.py RUN_DIR REFERENCE.nrrd [--threshold bone] [--grid output|reference]
        [--out DIR]

Runs the command a user runs (`python -m CTNeRFReconLib surface RUN_DIR --threshold T`), timed from a
fresh interpreter, extracts the reference's surface at the same threshold with the same code, and
reports the symmetric 95th-percentile and mean distances between them (each surface's vertices to the
other surface, sampled at its vertices and four points per triangle), areas and volumes, as a table
and JSON; with the run's volume.nrrd also where the truth's surface has none of ours within a voxel
(axial ends against the middle) and the peak both volumes reach there (`missing`).

`--grid` says where the run's field is evaluated: `output` (the default, what `surface RUN_DIR` gives a
user: the output grid) or `reference` (`surface --roi BOX --spacing MM` with the reference's box and
voxel: the field at the reference's own voxel centres, which a continuous field can give and a voxel
volume cannot). The grid floor (`grid_floor`) is the same measure for the ground truth itself,
resampled trilinearly onto that grid: what the grid allows at best. The iso-surface of a 3 mm CT at
+300 HU is largely small pieces and thin shells crossing the threshold by a few HU, and resampling moves
them by more than a voxel, so on the output grid even the truth is not within one voxel of itself
(docs/nerf.md, "The bone surface against the grid it is drawn on").
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree


def _points(poly) -> np.ndarray:
    from vtkmodules.util import numpy_support

    return numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64)


def _surface_samples(poly) -> np.ndarray:
    from vtkmodules.util import numpy_support

    p = _points(poly)
    cells = numpy_support.vtk_to_numpy(poly.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    a, b, c = p[cells[:, 0]], p[cells[:, 1]], p[cells[:, 2]]
    return np.concatenate([p] + [a + u * (b - a) + v * (c - a)
                                 for u, v in ((1 / 3, 1 / 3), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5))])


def _peak_sampler(volume):
    """Trilinear values at world points (mm) of `volume` after a 3-voxel maximum filter: the peak a
    structure reaches within one voxel, which is what decides whether it crosses the threshold. The
    filter runs once per volume; the returned function samples it."""
    from scipy import ndimage

    from CTNeRFReconLib.metrics import values_at

    peak = ndimage.maximum_filter(volume.array, size=3)
    return lambda points: values_at(peak, volume.grid, points, mode="nearest")


def surface_distances(ours, truth) -> tuple[np.ndarray, np.ndarray]:
    """(each of our vertices to the truth's surface, each of the truth's vertices to ours), in mm; the
    surface a vertex is measured to is sampled at its vertices and four points per triangle."""
    ours_to_truth = cKDTree(_surface_samples(truth)).query(_points(ours))[0]
    truth_to_ours = cKDTree(_surface_samples(ours)).query(_points(truth))[0]
    return ours_to_truth, truth_to_ours


def missing_truth(truth_points, truth_to_ours, reference, ours_volume, voxel_mm: float) -> dict:
    """Where the truth's surface has no surface of ours within one voxel, and why: the share of such
    points in the first and last tenth of the surface's axial extent (cone-beam coverage) against the
    middle, and the peak value the truth and our volume reach there (thin structures that our
    reconstruction leaves below the threshold show as a lower peak of ours)."""
    missing = truth_to_ours > voxel_mm
    z = truth_points[:, 2]
    lo, hi = np.percentile(z, [0, 100])
    ends = (z < lo + 0.1 * (hi - lo)) | (z > hi - 0.1 * (hi - lo))
    out = {"missing_fraction": float(missing.mean()),
           "missing_fraction_axial_ends": float(missing[ends].mean()) if ends.any() else None,
           "missing_fraction_middle": float(missing[~ends].mean()) if (~ends).any() else None}
    truth_peak, ours_peak = _peak_sampler(reference), _peak_sampler(ours_volume)
    for name, where in (("missing", missing), ("found", ~missing)):
        if where.any():
            out[f"{name}_truth_peak_median"] = float(np.median(truth_peak(truth_points[where])))
            out[f"{name}_ours_peak_median"] = float(np.median(ours_peak(truth_points[where])))
    return out


def grid_floor(reference, truth_surface, grid, threshold: float) -> dict:
    """The measure for the ground truth itself on `grid` (trilinear resampling, the same surface
    extraction): the HD95 a perfect reconstruction would get there."""
    from CTNeRFReconLib.data import Volume
    from CTNeRFReconLib.metrics import values_at
    from CTNeRFReconLib.surface import extract_surface

    points = grid.world_points(np.float64).reshape(-1, 3)
    resampled = Volume(values_at(reference.array, reference.grid, points).reshape(grid.shape_zyx).astype(np.float32),
                       grid)
    a, b = surface_distances(extract_surface(resampled, threshold), truth_surface)
    return {"hd95_mm": float(np.percentile(np.concatenate([a, b]), 95)),
            "hd95_ours_to_truth_mm": float(np.percentile(a, 95)), "hd95_truth_to_ours_mm": float(np.percentile(b, 95))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--threshold", default="bone")
    parser.add_argument("--grid", choices=("output", "reference"), default="output",
                        help="evaluate the run on its output grid (as `surface RUN_DIR`) or on the reference's voxels")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/surface"))
    args = parser.parse_args(argv)
    from CTNeRFReconLib.geometry import VolumeGrid
    from CTNeRFReconLib.reference import load_reference
    from CTNeRFReconLib.surface import extract_surface, parse_threshold, read_surface, surface_stats

    args.out.mkdir(parents=True, exist_ok=True)
    surface_file = args.out / "surface.vtp"
    reference, units = load_reference(args.reference)
    box = []
    if args.grid == "reference":
        lo, hi = reference.grid.bounds()
        box = ["--roi", *(f"{v:.6f}" for v in (lo + hi) / 2), *(f"{v:.6f}" for v in hi - lo),
               "--spacing", f"{min(reference.grid.spacing_xyz):.6f}"]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "CTNeRFReconLib", "surface", str(args.run_dir),
                           f"--threshold={args.threshold}", *box, "--out", str(surface_file), "--overwrite", "--json"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return done.returncode
    engine = json.loads(done.stdout.strip().splitlines()[-1])
    ours = read_surface(surface_file)
    threshold = float(engine["threshold"]) if args.threshold == "auto" else parse_threshold(args.threshold)
    truth = extract_surface(reference, threshold)
    ours_to_truth, truth_to_ours = surface_distances(ours, truth)
    d = np.concatenate([ours_to_truth, truth_to_ours])
    floor = grid_floor(reference, truth, VolumeGrid.from_dict(engine["grid"]), threshold)
    result = {"run_dir": str(args.run_dir), "reference": str(args.reference), "threshold": args.threshold,
              "grid": args.grid, "evaluated_on": engine["grid"], "grid_floor": floor,
              "threshold_mu": threshold, "reference_units": units, "surface_command_s": round(seconds, 2),
              "hd95_mm": float(np.percentile(d, 95)), "mean_distance_mm": float(d.mean()),
              # the two directions apart: a surface that misses thin structures shows in truth -> ours,
              # one with spurious islands in ours -> truth
              "hd95_ours_to_truth_mm": float(np.percentile(ours_to_truth, 95)),
              "hd95_truth_to_ours_mm": float(np.percentile(truth_to_ours, 95)),
              "voxel_mm": float(min(reference.grid.spacing_xyz)), "ours": surface_stats(ours),
              "truth": surface_stats(truth), "engine_note": engine.get("note")}
    volume_file = args.run_dir / "volume.nrrd"
    if volume_file.exists():
        from CTNeRFReconLib.volume_io import read_volume

        result["missing"] = missing_truth(_points(truth), truth_to_ours, reference, read_volume(volume_file),
                                          result["voxel_mm"])
    print("| threshold | grid | seconds | HD95 mm | ours -> truth / truth -> ours | mean mm | voxel mm | "
          "area ours / truth mm^2 | volume ours / truth mm^3 | grid floor: HD95 mm |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.threshold} ({threshold:.4g}/mm) | {args.grid} | {seconds:.1f} | {result['hd95_mm']:.2f} | "
          f"{result['hd95_ours_to_truth_mm']:.2f} / {result['hd95_truth_to_ours_mm']:.2f} | "
          f"{result['mean_distance_mm']:.2f} | {result['voxel_mm']:.3g} | {result['ours']['area_mm2']:.0f} / "
          f"{result['truth']['area_mm2']:.0f} | {result['ours']['volume_mm3']:.0f} / {result['truth']['volume_mm3']:.0f} | "
          f"{floor['hd95_mm']:.2f} |")
    if "missing" in result:
        m = result["missing"]
        print(f"truth surface farther than one voxel from ours: {100 * m['missing_fraction']:.0f} % "
              f"({100 * m['missing_fraction_axial_ends']:.0f} % in the axial tenths at the ends, "
              f"{100 * m['missing_fraction_middle']:.0f} % in the middle); peak within one voxel there: "
              f"truth {m.get('missing_truth_peak_median', float('nan')):.4f}, "
              f"ours {m.get('missing_ours_peak_median', float('nan')):.4f} /mm "
              f"(where found: {m.get('found_truth_peak_median', float('nan')):.4f} / "
              f"{m.get('found_ours_peak_median', float('nan')):.4f})")
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
