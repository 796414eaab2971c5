"""R2-Gaussian folders: scanner block in R2's order, per-view .npy images row-flipped, vol_gt[x, y, z].

Written here with those documented conventions from RTK Joseph projections through the
hand-derived equivalent RTK geometry (see rtk_joseph.tigre_joseph), then loaded and re-projected.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from CTNeRFReconLib.data import Volume
from CTNeRFReconLib.formats import load_scan, write_stack
from CTNeRFReconLib.formats.r2gaussian import write_r2gaussian
from CTNeRFReconLib.geometry import VolumeGrid
from CTNeRFReconLib.simulate import ct_to_reference, project_volume

itk = pytest.importorskip("itk", reason="itk-rtk is the independent reference projector")
from rtk_joseph import DATA, rel_rms, tigre_joseph  # noqa: E402

ANGLES = np.array([0.0, 2.2, 4.4])


def scanner(n_xyz, off_uv=(-5.0, 8.0), off_xyz=(-6.0, 4.0, 0.0)):
    return {"mode": "cone", "filter": None, "DSD": 1400.0, "DSO": 950.0,
            "nDetector": [44, 52], "sDetector": [44 * 11.0, 52 * 9.5],       # [v, u]
            "nVoxel": list(n_xyz), "sVoxel": [6.0 * n for n in n_xyz],          # [x, y, z]
            "offOrigin": list(off_xyz), "offDetector": list(off_uv),           # [x, y, z], [u, v]
            "accuracy": 0.5, "totalAngle": 360.0, "startAngle": 0.0, "noise": False}


@pytest.fixture(scope="module")
def ct():
    path = DATA / "abdomen_ct.nii.gz"
    if not path.exists():
        pytest.skip(f"reference CT absent: {path}")
    return ct_to_reference(path, 6.0, 0.02).array


def test_r2gaussian_folder_matches_joseph(ct, tmp_path):
    nz, ny, nx = ct.shape
    sc = scanner((nx, ny, nz))
    raw = tigre_joseph(ct, (6.0, 6.0, 6.0), sc["offOrigin"], sc["DSD"], sc["DSO"], sc["nDetector"],
                       (11.0, 9.5), (sc["offDetector"][1], sc["offDetector"][0]), ANGLES)
    write_r2gaussian(tmp_path / "case", raw[:, ::-1, :], ANGLES, sc, vol_xyz=np.transpose(ct, (2, 1, 0)),
                     test=(raw[:1, ::-1, :], ANGLES[:1]))
    scan = load_scan(tmp_path / "case")
    assert scan.source_format == "r2gaussian" and scan.projections.shape == (3, 44, 52)
    assert scan.geometry.pixel_pitch == (11.0, 9.5)
    assert np.allclose(scan.reference.array, ct)
    assert scan.validation.n_views == 1
    ours = project_volume(scan.reference, scan.geometry, step_fraction=0.25)
    err = rel_rms(ours, scan.projections)
    assert err < 0.01, f"relative RMS {err:.4f}"
    # the meta_data.json itself is also accepted
    assert load_scan(tmp_path / "case" / "meta_data.json").n_views == 3


def test_bead_and_round_trip(tmp_path):
    # angle 0: source (950, 0, 0), detector plane x = -450. Pixel col 40 sits at
    # y = (40 - 25.5) * 9.5 + offU (-5) = 132.75; R2 row 10 is TIGRE row 43 - 10 = 33 at
    # z = (33 - 21.5) * 11 + offV (8) = 134.5. A bead on that ray at x = 0 is (0, 132.75, 134.5) * 950 / 1400.
    n = 8
    proj = np.ones((2, 44, 52), np.float32)
    sc = scanner((n, n, n), off_xyz=(0.0, 0.0, 0.0))
    write_r2gaussian(tmp_path / "b", proj, [0.0, np.pi], sc)
    scan = load_scan(tmp_path / "b")
    bead = np.array([0.0, 132.75, 134.5]) * 950.0 / 1400.0
    assert np.allclose(scan.geometry.project_points(bead[None], 0), [[10.0, 40.0]], atol=1e-9)
    grid = VolumeGrid.centered((9, 9, 9), (1.0, 1.0, 1.0), tuple(bead))
    arr = np.zeros(grid.shape_zyx, np.float32)
    arr[4, 4, 4] = 1.0
    img = project_volume(Volume(arr, grid), scan.geometry.subset([0]))[0]
    assert np.unravel_index(np.argmax(img), img.shape) == (10, 40)
    # angle pi: everything turns by 180 degrees about z (u along -y, centre at (450, 5, 8)), so the
    # bead mirrored in x and y lands on the same pixel
    mirrored = bead * np.array([-1.0, -1.0, 1.0])
    assert np.allclose(scan.geometry.project_points(mirrored[None], 1), [[10.0, 40.0]], atol=1e-9)
    back = load_scan(write_stack(scan, tmp_path / "c" / "scan.json"))
    for name in ("sources", "det_centers", "det_u", "det_v"):
        assert np.allclose(getattr(back.geometry, name), getattr(scan.geometry, name)), name
    meta = json.loads((tmp_path / "b" / "meta_data.json").read_text())
    assert meta["scanner"]["nDetector"] == [44, 52]
