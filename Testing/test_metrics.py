"""Metrics: agreement with the referee's score.py, world-coordinate resampling, structure scores."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from CTNeRFReconLib.data import Volume
from CTNeRFReconLib.geometry import VolumeGrid
from CTNeRFReconLib.metrics import (dice, difference_volume, hd95, line_profile, psnr3d, score_volumes,
                                    structure_scores, surface_dice)
from CTNeRFReconLib.volume_io import write_volume

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "bench"


def _sphere(grid: VolumeGrid, centre, radius, value=1.0):
    pts = grid.world_points(np.float64)
    return np.where(np.linalg.norm(pts - np.asarray(centre), axis=-1) <= radius, value, 0.0).astype(np.float32)


def _volumes():
    ref_grid = VolumeGrid((30, 26, 22), (2.0, 2.0, 2.5), (-29.0, -25.0, -26.0))
    rng = np.random.default_rng(0)
    ref = Volume(_sphere(ref_grid, (3, -2, 1), 18, 0.02) + _sphere(ref_grid, (-5, 4, 0), 6, 0.015), ref_grid)
    # a reconstruction on another grid (finer, shifted), with noise
    rec_grid = VolumeGrid((40, 36, 30), (1.6, 1.6, 2.0), (-31.0, -28.0, -29.0))
    rec = Volume(_sphere(rec_grid, (3, -2, 1), 18, 0.02) + _sphere(rec_grid, (-5, 4, 0), 6, 0.015)
                 + rng.normal(0, 0.001, rec_grid.shape_zyx).astype(np.float32), rec_grid)
    return ref, rec


@pytest.mark.skipif(not (BENCH / "score.py").exists(), reason=f"{BENCH} not found (the referee sits beside the repo)")
def test_scores_equal_the_referee(tmp_path):
    ref, rec = _volumes()
    write_volume(ref, tmp_path / "ref.nrrd")
    write_volume(rec, tmp_path / "rec.nrrd")
    out = subprocess.run([sys.executable, str(BENCH / "score.py"), str(tmp_path / "ref.nrrd"),
                          str(tmp_path / "rec.nrrd")], capture_output=True, text=True, check=True)
    theirs = json.loads(out.stdout)
    ours = score_volumes(ref, rec)
    assert ours["psnr"] == pytest.approx(theirs["psnr"], abs=2e-3)
    assert ours["ssim"] == pytest.approx(theirs["ssim"], abs=2e-4)
    assert ours["nrmse"] == pytest.approx(theirs["nrmse"], abs=2e-5)


def test_psnr_sees_a_misplaced_volume():
    ref, rec = _volumes()
    good = score_volumes(ref, rec)["psnr"]
    shifted = Volume(rec.array, VolumeGrid(rec.grid.shape_xyz, rec.grid.spacing_xyz,
                                           np.add(rec.grid.origin_xyz, (6.0, 0, 0))))
    assert score_volumes(ref, shifted)["psnr"] < good - 6
    assert psnr3d(ref.array, ref.array) == float("inf")


def test_structure_scores_of_shifted_spheres():
    grid = VolumeGrid.centered((60, 60, 60), (1.0, 1.0, 1.0))
    a = _sphere(grid, (0, 0, 0), 15) > 0
    b = _sphere(grid, (3, 0, 0), 15) > 0
    assert dice(a, a) == 1.0
    assert 0.8 < dice(a, b) < 0.9  # two radius-15 spheres 3 apart: overlap ~0.85
    assert hd95(a, b, (1, 1, 1)) == pytest.approx(3.0, abs=1.0)
    assert surface_dice(a, b, (1, 1, 1), 4.0) == pytest.approx(1.0)
    assert surface_dice(a, b, (1, 1, 1), 1.0) < 0.7


def test_structure_scores_thresholded_and_labelled():
    ref, rec = _volumes()
    s = structure_scores(ref, rec, thresholds={"body": 0.01})
    assert s["body"]["dice"] > 0.95 and s["body"]["hd95_mm"] < 3.0
    # label 1: the large sphere; label 2: the small, brighter sphere inside it
    labels = Volume((ref.array > 0.01).astype(np.float32) + (ref.array > 0.03).astype(np.float32), ref.grid)
    scored = structure_scores(ref, rec, labels=labels)
    assert set(scored) == {"label_1", "label_2"}
    assert all(v["dice"] > 0.8 for v in scored.values())


def test_difference_and_profile():
    ref, rec = _volumes()
    diff = difference_volume(ref, rec)
    assert diff.grid == ref.grid and abs(float(diff.array.mean())) < 1e-3
    dist, vals = line_profile(ref, (-20, -2, 1), (26, -2, 1), n=47)
    assert dist[-1] == pytest.approx(46.0)
    assert vals[23] == pytest.approx(0.02, abs=1e-3) and vals[0] == pytest.approx(0.0)


def test_heldout_projection_psnr_ranks_volumes():
    """A volume that explains the held-out views scores far higher than a blurred, shifted one."""
    from CTNeRFReconLib.data import ScanData
    from CTNeRFReconLib.geometry import circular_geometry
    from CTNeRFReconLib.metrics import heldout_projection_psnr
    from CTNeRFReconLib.phantom import Ellipsoid, phantom_line_integrals
    from CTNeRFReconLib.rays import all_pixel_indices, view_rays

    geo = circular_geometry(300.0, 450.0, np.radians([17.0, 130.0]), (32, 40), (3.0, 3.0), axis="y")
    balls = [Ellipsoid((0.0, 0.0, 0.0), (40.0, 30.0, 35.0), 0.02), Ellipsoid((15.0, -8.0, 6.0), (8.0, 8.0, 8.0), 0.01)]
    lo, hi = np.full(3, -100.0), np.full(3, 100.0)
    v, r, c = all_pixel_indices(geo)
    rays = view_rays(geo, v, r, c, lo, hi)
    p = phantom_line_integrals(balls, rays.origins.double().numpy(), rays.directions.double().numpy())
    held_out = ScanData(p.reshape(2, 32, 40).astype(np.float32), geo, "test", "<phantom>")
    grid = VolumeGrid.centered((50, 40, 44), (2.0, 2.0, 2.0))
    true = Volume(sum(_ellipsoid(grid, b) for b in balls).astype(np.float32), grid)
    shifted = Volume(np.roll(true.array, 3, axis=2), grid)
    good, bad = heldout_projection_psnr(true, held_out), heldout_projection_psnr(shifted, held_out)
    assert good > 30 and good > bad + 10, (good, bad)


def _ellipsoid(grid, e):
    pts = grid.world_points(np.float64)
    q = ((pts - np.asarray(e.center)) / np.asarray(e.semi_axes)) ** 2
    return np.where(q.sum(-1) <= 1.0, e.value, 0.0)


def test_surface_distances_equal_full_volume_distance_transforms():
    """The distance transforms run on the surfaces' bounding box only; that must change no value."""
    from scipy import ndimage

    from CTNeRFReconLib.metrics import surface_distances

    def brute(a, b, spacing):
        sa = a & ~ndimage.binary_erosion(a, border_value=0)
        sb = b & ~ndimage.binary_erosion(b, border_value=0)
        if not sb.any():
            return np.full(int(sa.sum()), np.inf)
        return ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]

    rng = np.random.default_rng(3)
    spacing = (2.5, 1.0, 1.5)
    for _ in range(6):
        a = np.zeros((30, 34, 28), bool)
        b = np.zeros_like(a)
        for m in (a, b):  # a few random boxes each, some touching the border
            for _ in range(rng.integers(1, 4)):
                lo = rng.integers(0, 25, 3)
                hi = lo + rng.integers(2, 10, 3)
                m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
        da, db = surface_distances(a, b, spacing)
        np.testing.assert_array_equal(da, brute(a, b, spacing))
        np.testing.assert_array_equal(db, brute(b, a, spacing))
    empty = np.zeros((5, 5, 5), bool)
    full = np.ones((5, 5, 5), bool)
    da, db = surface_distances(full, empty, spacing)
    assert np.all(np.isinf(da)) and db.size == 0
    assert surface_dice(empty, empty, spacing, 1.0) == 1.0 and np.isnan(hd95(empty, empty, spacing))


def test_hd95_of_a_structure_missing_from_one_volume_is_infinite_without_a_warning():
    """The demo's short run has no voxel above the bone threshold: no numpy warning may leak (inf - inf
    in np.percentile's interpolation); the distance is infinite (null in JSON)."""
    import warnings

    from CTNeRFReconLib.metrics import hd95

    a = np.zeros((8, 8, 8), dtype=bool)
    a[2:6, 2:6, 2:6] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hd95(a, np.zeros_like(a), (1.0, 1.0, 1.0)) == float("inf")
        assert hd95(a, a, (1.0, 1.0, 1.0)) == 0.0
