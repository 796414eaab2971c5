"""FDK: values, placement (axis order, flips, offsets) and agreement with RTK's own FDK."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from CTNeRFReconLib.data import ScanData
from CTNeRFReconLib.fdk import FDKConfig, angular_weights, fdk, isocentre
from CTNeRFReconLib.geometry import VolumeGrid, circular_geometry
from CTNeRFReconLib.metrics import psnr3d, score_volumes
from CTNeRFReconLib.phantom import Ellipsoid, phantom_line_integrals
from CTNeRFReconLib.rays import all_pixel_indices, view_rays

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

BODY = Ellipsoid((0.0, 0.0, 0.0), (60.0, 45.0, 50.0), 0.02)
BEAD = Ellipsoid((28.0, -14.0, 12.0), (6.0, 6.0, 6.0), 0.03)


def _scan(geometry):
    lo, hi = np.full(3, -200.0), np.full(3, 200.0)
    v, r, c = all_pixel_indices(geometry)
    rays = view_rays(geometry, v, r, c, lo, hi)
    p = phantom_line_integrals([BODY, BEAD], rays.origins.double().numpy(), rays.directions.double().numpy())
    return ScanData(p.reshape(geometry.n_views, *geometry.det_shape).astype(np.float32), geometry, "test", "<phantom>")


def _bead_centroid(volume):
    """World centroid of the bright bead (values above the body's)."""
    a = volume.array
    mask = a > 0.035
    idx = np.argwhere(mask)[:, ::-1].astype(float)  # (x, y, z)
    w = a[mask]
    c = (idx * w[:, None]).sum(0) / w.sum()
    m = volume.grid.index_to_world_matrix()
    return m[:3, :3] @ c + m[:3, 3]


@pytest.mark.parametrize("axis,offset", [("y", (0.0, 0.0)), ("z", (0.0, 0.0)), ("y", (9.0, -14.0))])
def test_values_and_placement(axis, offset):
    geo = circular_geometry(400.0, 600.0, np.radians(np.arange(120) * 3.0), (96, 112), (2.4, 2.4),
                            det_offset=offset, axis=axis)
    grid = VolumeGrid.centered((48, 40, 44), (3.0, 3.0, 3.0))
    vol = fdk(_scan(geo), grid, FDKConfig(filter="hann"))
    # the body's interior value (away from the cone-beam-artifact-prone top and bottom)
    centre = vol.array[20:24, 18:22, 10:14].mean()
    assert centre == pytest.approx(0.02, rel=0.04)
    # the bead lands where it is: an axis swap, a flip or an ignored offset moves it by >> a voxel
    np.testing.assert_allclose(_bead_centroid(vol), BEAD.center, atol=2.0)


def test_angular_weights_cover_the_orbit():
    geo = circular_geometry(400.0, 600.0, np.radians([0, 10, 30, 90, 200, 300]), (8, 8), (1.0, 1.0), axis="y")
    w, arc = angular_weights(geo, isocentre(geo))
    assert w.sum() == pytest.approx(2 * np.pi)
    assert w[0] == pytest.approx(np.radians((10 + 60) / 2))  # neighbours 300 (= -60) and 10 degrees
    np.testing.assert_allclose(isocentre(geo), 0.0, atol=1e-9)


def test_filters_differ_and_bad_filter_is_refused():
    geo = circular_geometry(400.0, 600.0, np.radians(np.arange(60) * 6.0), (48, 48), (4.8, 4.8), axis="y")
    scan = _scan(geo)
    grid = VolumeGrid.centered((24, 24, 24), (6.0, 6.0, 6.0))
    a = fdk(scan, grid, FDKConfig(filter="ram-lak")).array
    b = fdk(scan, grid, FDKConfig(filter="hann")).array
    assert np.abs(a - b).max() > 1e-4 and np.abs(a).std() > np.abs(b).std()
    with pytest.raises(ValueError, match="unknown FDK filter"):
        FDKConfig(filter="box")


@pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} not found (the shared CT data sits beside the repo)")
def test_matches_rtk_fdk_on_an_rtk_made_case(tmp_path):
    """Both scored in world coordinates against the ground truth: within 0.5 dB of RTK's FDK."""
    pytest.importorskip("itk")
    from CTNeRFReconLib.formats import load_scan
    from CTNeRFReconLib.volume_io import read_volume
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from rtk_reference import make_case, run_peer

    case = make_case(DATA / "abdomen_ct.nii.gz", tmp_path / "case", views=40, det=120, pitch=6.4, voxel=6.0)
    ref = read_volume(case / "reference.nrrd")
    run_peer(case, "rtk-fdk", tmp_path / "rtk_fdk.nrrd")
    theirs = score_volumes(ref, read_volume(tmp_path / "rtk_fdk.nrrd"))
    ours = score_volumes(ref, fdk(load_scan(case), ref.grid, FDKConfig(filter="ram-lak")))
    assert ours["psnr"] > theirs["psnr"] - 0.5, (ours, theirs)
    assert psnr3d(ref.array, ref.array + 0.0) == float("inf")
