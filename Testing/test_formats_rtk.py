"""RTK adapter: our renderer on the loaded geometry must reproduce RTK's Joseph projector.

The case is written with RTK's own XML writer (itk-rtk), with detector and source offsets,
in-plane and out-of-plane angles and a projection stack whose origin is not centred: every
parameter of the format has to be understood for the projections to agree.
"""
from __future__ import annotations

import numpy as np
import pytest

from CTNeRFReconLib.data import ScanData, Volume
from CTNeRFReconLib.formats import load_scan, write_rtk_case
from CTNeRFReconLib.formats.rtk import read_rtk_geometry_xml, rtk_matrix, rtk_to_geometry
from CTNeRFReconLib.geometry import VolumeGrid
from CTNeRFReconLib.simulate import ct_to_reference, project_volume

itk = pytest.importorskip("itk", reason="itk-rtk is the independent reference projector")
from rtk_joseph import DATA, joseph, rel_rms, rtk_geometry, write_rtk_files  # noqa: E402

VIEWS = [
    dict(sid=800, sdd=1200, gantry=0),
    dict(sid=800, sdd=1200, gantry=77, px=15, py=-10, oop=5, ip=10, sx=10, sy=-5),
    dict(sid=850, sdd=1250, gantry=163, px=-20, py=5, oop=-8, ip=-15, sx=-7, sy=4),
    dict(sid=800, sdd=1300, gantry=251, px=8, py=12, oop=12, ip=3, sx=3, sy=8),
]
DET_SIZE = (64, 56)          # u (cols), v (rows)
DET_ORIGIN = (-300.0, -230.0)  # first pixel, not centred
DET_SPACING = (10.0, 9.0)


@pytest.fixture(scope="module")
def abdomen():
    ct = DATA / "abdomen_ct.nii.gz"
    if not ct.exists():
        pytest.skip(f"reference CT absent: {ct}")
    return ct_to_reference(ct, 6.0, 0.02)


def test_rtk_case_matches_joseph(abdomen, tmp_path):
    vol = abdomen
    assert vol.array.shape == (56, 51, 61)
    geom = rtk_geometry(VIEWS)
    ref = joseph(vol.array, vol.grid.origin_xyz, vol.grid.spacing_xyz, geom, DET_SIZE, DET_ORIGIN, DET_SPACING)
    xml = write_rtk_files(tmp_path / "case", geom, ref, DET_ORIGIN, DET_SPACING)
    # an unrelated image in the folder must be ignored: the stack is the one named projections.*
    itk.imwrite(itk.image_from_array(np.zeros((3, 3, 3), np.float32)), str(tmp_path / "case" / "other.nrrd"))
    scan = load_scan(tmp_path / "case")
    assert scan.source_format == "rtk" and scan.projections.shape == (4, 56, 64)
    ours = project_volume(vol, scan.geometry, step_fraction=0.25)
    err = rel_rms(ours, ref)
    assert err < 0.01, f"relative RMS {err:.4f} between our projections and RTK Joseph"
    # per view, so that one wrong angle cannot hide in the average
    for v in range(4):
        assert rel_rms(ours[v], ref[v]) < 0.01, f"view {v}"
    # negative control: reading the stack as centred on the detector (ignoring its origin, the
    # mistake of RTK issue 497) must be far off, so the comparison above can fail
    centred = read_rtk_geometry_xml(xml)
    wrong = rtk_to_geometry(centred, DET_SIZE, (-(DET_SIZE[0] - 1) / 2 * DET_SPACING[0],
                                                -(DET_SIZE[1] - 1) / 2 * DET_SPACING[1]), DET_SPACING)
    assert rel_rms(project_volume(vol, wrong.subset([0])), ref[:1]) > 0.1


def test_bead_lands_on_hand_computed_pixel():
    # gantry 0: source (0, 0, 1000), detector z = -500: bead (32, -19.2, 40) hits (50, -30) in the plane,
    # = detector coordinate (45, -30) after ProjectionOffsetX = 5 -> col (45 + 100) / 2.5 = 58, row (-30 + 80) / 2.5 = 20.
    # gantry 90 rotates the scene: the bead Ry(90) (32, -19.2, 40) = (40, -19.2, -32) lands on the same pixel.
    p = {k: np.zeros(2) for k in ("OutOfPlaneAngle", "InPlaneAngle", "SourceOffsetX", "SourceOffsetY",
                                  "ProjectionOffsetY")}
    p.update(SourceToIsocenterDistance=np.full(2, 1000.0), SourceToDetectorDistance=np.full(2, 1500.0),
             GantryAngle=np.array([0.0, 90.0]), ProjectionOffsetX=np.full(2, 5.0))
    g = rtk_to_geometry(p, (80, 70), (-100.0, -80.0), (2.5, 2.5))
    beads = [np.array([32.0, -19.2, 40.0]), np.array([40.0, -19.2, -32.0])]
    for view, bead in enumerate(beads):
        assert np.allclose(g.project_points(bead[None], view), [[20.0, 58.0]], atol=1e-9)
        grid = VolumeGrid.centered((9, 9, 9), (1.0, 1.0, 1.0), tuple(bead))
        arr = np.zeros(grid.shape_zyx, np.float32)
        arr[4, 4, 4] = 1.0
        img = project_volume(Volume(arr, grid), g.subset([view]))[0]
        assert np.unravel_index(np.argmax(img), img.shape) == (20, 58)


def test_write_rtk_case_round_trip_and_rtk_reads_it(tmp_path):
    from itk import RTK as rtk
    geom = rtk_geometry(VIEWS)
    proj = np.random.default_rng(0).uniform(0.1, 2.0, (4, 56, 64)).astype(np.float32)
    write_rtk_files(tmp_path / "a", geom, proj, DET_ORIGIN, DET_SPACING)
    scan = load_scan(tmp_path / "a" / "geometry.xml")
    xml = write_rtk_case(scan, tmp_path / "b")
    back = load_scan(tmp_path / "b")
    for name in ("sources", "det_centers", "det_u", "det_v"):
        assert np.allclose(getattr(back.geometry, name), getattr(scan.geometry, name), atol=1e-6), name
    assert np.allclose(back.projections, scan.projections)
    # RTK itself reads our XML and computes the same projection matrices we wrote
    reader = rtk.ThreeDCircularProjectionGeometryXMLFileReader.New()
    reader.SetFilename(str(xml))
    reader.GenerateOutputInformation()
    theirs = reader.GetOutputObject()
    ours = read_rtk_geometry_xml(xml)
    for k in range(4):
        m = itk.array_from_matrix(theirs.GetMatrix(k))
        assert np.allclose(m, rtk_matrix(ours, k), rtol=1e-9, atol=1e-6)
    # and the original RTK matrices are those of the first case
    orig = read_rtk_geometry_xml(tmp_path / "a" / "geometry.xml")
    for k in range(4):
        assert np.allclose(itk.array_from_matrix(geom.GetMatrix(k)), rtk_matrix(orig, k), atol=1e-6)


def test_explicit_projection_stack(tmp_path):
    geom = rtk_geometry(VIEWS[:2])
    proj = np.random.default_rng(1).uniform(0.1, 2.0, (2, 56, 64)).astype(np.float32)
    write_rtk_files(tmp_path, geom, proj, DET_ORIGIN, DET_SPACING, name="stackA.mha")
    write_rtk_files(tmp_path / "x", geom, proj, DET_ORIGIN, DET_SPACING, name="stackB.mha")
    scan = load_scan(tmp_path / "geometry.xml")  # the only image beside the XML
    assert np.allclose(scan.projections, proj)
    scan2 = load_scan(tmp_path / "geometry.xml", projections=tmp_path / "x" / "stackB.mha")
    assert np.allclose(scan2.projections, proj)
