"""NAF / TIGRE pickles: TIGRE's conventions checked against RTK's Joseph and a hand-computed bead.

Conventions (TIGRE source, computeDeltas_Siddon and the Python wrapper): rotation axis z, source
at Rz(a) (DSO, 0, 0); Python arrays img[z, y, x] and proj[angle, v, u] with v along +z (row 0 at
the bottom); nVoxel/dVoxel/offOrigin [z, y, x], nDetector/dDetector/offDetector [v, u].
NAF stores the config with voxel fields [x, y, z] and offDetector [u, v], image[x, y, z], and the
projections row-flipped, all lengths in mm but projected in metres (image in 1/m).
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from CTNeRFReconLib.data import Volume
from CTNeRFReconLib.formats import load_scan, write_stack
from CTNeRFReconLib.geometry import VolumeGrid
from CTNeRFReconLib.simulate import ct_to_reference, project_volume

itk = pytest.importorskip("itk", reason="itk-rtk is the independent reference projector")
from rtk_joseph import DATA, rel_rms, rtk_geometry, tigre_joseph  # noqa: E402

DSD, DSO = 1500.0, 1000.0
NDET_VU, DDET_VU = (40, 56), (12.0, 10.0)
OFFDET_UV = (6.0, -4.0)
OFFORIGIN_XYZ = (5.0, -8.0, 12.0)
ANGLES = np.array([0.3, 1.9, 4.0])


@pytest.fixture(scope="module")
def case():
    ct = DATA / "abdomen_ct.nii.gz"
    if not ct.exists():
        pytest.skip(f"reference CT absent: {ct}")
    img = ct_to_reference(ct, 6.0, 0.02).array  # treated as TIGRE's img[z, y, x], 1/mm
    raw = tigre_joseph(img, (6.0, 6.0, 6.0), OFFORIGIN_XYZ, DSD, DSO, NDET_VU, DDET_VU,
                       (OFFDET_UV[1], OFFDET_UV[0]), ANGLES)
    return img, raw


def naf_dict(img_zyx, proj_rowdown, angles):
    nz, ny, nx = img_zyx.shape
    return {"DSD": DSD, "DSO": DSO, "nDetector": list(NDET_VU), "dDetector": list(DDET_VU),
            "nVoxel": [nx, ny, nz], "dVoxel": [6.0, 6.0, 6.0], "offOrigin": list(OFFORIGIN_XYZ),
            "offDetector": list(OFFDET_UV), "accuracy": 0.5, "mode": "cone", "filter": None,
            "totalAngle": 360.0, "startAngle": 0.0, "numTrain": len(angles), "numVal": 1,
            "image": np.transpose(img_zyx, (2, 1, 0)) * 1000.0,          # image[x, y, z] in 1/m
            "train": {"projections": proj_rowdown.astype(np.float32), "angles": angles},
            "val": {"projections": proj_rowdown[:1].astype(np.float32), "angles": angles[:1]}}


def test_naf_pickle_matches_joseph(case, tmp_path):
    img, raw = case
    path = tmp_path / "chest_50.pickle"
    path.write_bytes(pickle.dumps(naf_dict(img, raw[:, ::-1, :], ANGLES), protocol=pickle.HIGHEST_PROTOCOL))
    scan = load_scan(path)
    assert scan.source_format == "naf" and scan.projections.shape == (3, 40, 56)
    assert scan.validation is not None and scan.validation.n_views == 1
    assert scan.grid.shape_xyz == (img.shape[2], img.shape[1], img.shape[0])
    assert np.allclose(scan.reference.array, img, atol=1e-6)     # back to [z, y, x] and 1/mm
    ours = project_volume(scan.reference, scan.geometry, step_fraction=0.25)
    err = rel_rms(ours, scan.projections)
    assert err < 0.01, f"relative RMS {err:.4f} against RTK Joseph through the equivalent geometry"
    # RTK's source positions, mapped back from (X, Y, Z) = (y, z, x), are ours
    rtk = rtk_geometry([dict(sid=DSO, sdd=DSD, gantry=float(np.degrees(a))) for a in ANGLES])
    for k in range(3):
        X, Y, Z = np.array(rtk.GetSourcePosition(k))[:3]
        assert np.allclose(scan.geometry.sources[k], [Z, X, Y], atol=1e-6)
    # negative control: forgetting NAF's row flip must fail the same comparison
    flipped = project_volume(scan.reference, scan.geometry.subset([0]))[:, ::-1, :]
    assert rel_rms(flipped, scan.projections[:1]) > 0.05


def test_tigre_pickle_matches_joseph(case, tmp_path):
    img, raw = case
    d = {"geo": {"DSD": DSD, "DSO": DSO, "nDetector": list(NDET_VU), "dDetector": list(DDET_VU),
                 "nVoxel": list(img.shape), "dVoxel": [6.0, 6.0, 6.0], "offOrigin": list(OFFORIGIN_XYZ[::-1]),
                 "offDetector": [OFFDET_UV[1], OFFDET_UV[0]], "mode": "cone"},
         "angles": ANGLES, "projections": raw.astype(np.float32), "image": img}
    path = tmp_path / "scan.pkl"
    path.write_bytes(pickle.dumps(d, protocol=2))
    scan = load_scan(path)
    assert scan.source_format == "tigre"
    ours = project_volume(scan.reference, scan.geometry, step_fraction=0.25)
    assert rel_rms(ours, raw) < 0.01


def test_bead_on_hand_computed_pixel(tmp_path):
    # angle 0: source (1000, 0, 0), detector plane x = -500; bead (40, 32, -19.2) hits y = 50, z = -30.
    # col = (50 - offU 5) / 10 + 27.5 = 32; TIGRE row = -30 / 12 + 19.5 = 17, NAF row = 39 - 17 = 22.
    # at angle pi/2 the bead Rz(90) (40, 32, -19.2) = (-32, 40, -19.2) lands on the same pixel.
    proj = np.ones((2, 40, 56), np.float32)
    d = {"DSD": 1500.0, "DSO": 1000.0, "nDetector": [40, 56], "dDetector": [12.0, 10.0], "nVoxel": [8, 8, 8],
         "dVoxel": [1.0, 1.0, 1.0], "offOrigin": [0, 0, 0], "offDetector": [5.0, 0.0], "mode": "cone",
         "train": {"projections": proj, "angles": np.array([0.0, np.pi / 2])}}
    path = tmp_path / "bead.pickle"
    path.write_bytes(pickle.dumps(d))
    g = load_scan(path).geometry
    for view, bead in enumerate([np.array([40.0, 32.0, -19.2]), np.array([-32.0, 40.0, -19.2])]):
        assert np.allclose(g.project_points(bead[None], view), [[22.0, 32.0]], atol=1e-9)
        grid = VolumeGrid.centered((9, 9, 9), (1.0, 1.0, 1.0), tuple(bead))
        arr = np.zeros(grid.shape_zyx, np.float32)
        arr[4, 4, 4] = 1.0
        img = project_volume(Volume(arr, grid), g.subset([view]))[0]
        assert np.unravel_index(np.argmax(img), img.shape) == (22, 32)


def test_naf_round_trip_through_our_json(case, tmp_path):
    img, raw = case
    path = tmp_path / "a.pickle"
    path.write_bytes(pickle.dumps(naf_dict(img, raw[:, ::-1, :], ANGLES)))
    scan = load_scan(path)
    back = load_scan(write_stack(scan, tmp_path / "b" / "scan.json"))
    for name in ("sources", "det_centers", "det_u", "det_v"):
        assert np.allclose(getattr(back.geometry, name), getattr(scan.geometry, name)), name
    assert back.grid.shape_xyz == scan.grid.shape_xyz and np.allclose(back.grid.origin_xyz, scan.grid.origin_xyz)
    assert np.array_equal(back.projections, scan.projections)


def test_naf_writer_round_trip(case, tmp_path):
    """scan_to_naf_dict (the NAF exporter) writes the layout the reader was checked on above."""
    from CTNeRFReconLib.formats.tigre import scan_to_naf_dict

    img, raw = case
    by_hand = naf_dict(img, raw[:, ::-1, :], ANGLES)
    nz, ny, nx = img.shape
    written = scan_to_naf_dict(raw[:, ::-1, :], ANGLES, DSD, DSO, NDET_VU, DDET_VU, (nx, ny, nz), (6.0, 6.0, 6.0),
                               OFFORIGIN_XYZ, OFFDET_UV, image_xyz=by_hand["image"], val=by_hand["val"])
    (tmp_path / "a.pickle").write_bytes(pickle.dumps(by_hand))
    (tmp_path / "b.pickle").write_bytes(pickle.dumps(written))
    a, b = load_scan(tmp_path / "a.pickle"), load_scan(tmp_path / "b.pickle")
    for name in ("sources", "det_centers", "det_u", "det_v"):
        assert np.array_equal(getattr(a.geometry, name), getattr(b.geometry, name)), name
    assert np.array_equal(a.projections, b.projections) and np.array_equal(a.reference.array, b.reference.array)
    assert a.grid.to_dict() == b.grid.to_dict() and b.validation.n_views == 1
