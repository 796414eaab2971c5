"""simulate_case: our renderer's case must equal RTK's Joseph projection of the written reference,
read back through RTK's own XML reader, and must load through load_scan."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from CTNeRFReconLib.formats import describe, load_scan
from CTNeRFReconLib.simulate import simulate_case

itk = pytest.importorskip("itk", reason="itk-rtk is the independent reference projector")
from rtk_joseph import DATA, joseph, rel_rms  # noqa: E402


@pytest.fixture(scope="module")
def ct():
    path = DATA / "abdomen_small_ct.nii.gz"
    if not path.exists():
        pytest.skip(f"reference CT absent: {path}")
    return path


def test_simulated_case_matches_rtk(ct, tmp_path):
    from itk import RTK as rtk
    info = simulate_case(ct, tmp_path / "case", views=5, det=48, pitch=10.0, i0=0, voxel=6.0)
    assert info["grid"] == [61, 51, 15]
    case = tmp_path / "case"
    assert {p.name for p in case.iterdir()} >= {"geometry.xml", "projections.mha", "reference.nrrd", "case.json"}
    reader = rtk.ThreeDCircularProjectionGeometryXMLFileReader.New()
    reader.SetFilename(str(case / "geometry.xml"))
    reader.GenerateOutputInformation()
    geom = reader.GetOutputObject()
    assert np.allclose(np.degrees(np.array(geom.GetGantryAngles())), np.arange(5) * 72.0)
    ref = sitk.ReadImage(str(case / "reference.nrrd"))
    stack = sitk.ReadImage(str(case / "projections.mha"))
    expected = joseph(sitk.GetArrayFromImage(ref), ref.GetOrigin(), ref.GetSpacing(), geom, stack.GetSize()[:2],
                      stack.GetOrigin()[:2], stack.GetSpacing()[:2])
    ours = sitk.GetArrayFromImage(stack)
    err = rel_rms(ours, expected)
    assert err < 0.01, f"relative RMS {err:.4f} between our simulation and RTK Joseph"
    scan = load_scan(case)
    assert scan.source_format == "rtk" and scan.reference is not None
    assert np.allclose(scan.projections, ours)
    words = describe(scan)
    assert "RTK case" in words["description"] and words["summary"]["views"] == 5
    assert json.loads((case / "case.json").read_text())["projector"] == "ctnerfrecon"


def test_noise_level(ct, tmp_path):
    info = simulate_case(ct, tmp_path / "n", views=2, det=24, pitch=20.0, i0=1e4, voxel=9.0, seed=3)
    # Poisson noise on -log(counts / I0): about 1 / sqrt(I0 exp(-p)) per pixel, i.e. a few percent of the max
    assert 0.001 < info["noise_rel_rmse"] < 0.05
    scan = load_scan(tmp_path / "n" / "geometry.xml")
    assert scan.projections.min() >= -0.2
