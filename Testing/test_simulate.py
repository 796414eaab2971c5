"""simulate_case: our projector's case (Joseph's rule, our kernel) must equal RTK's Joseph projection of the
written reference, read back through RTK's own XML reader, and must load through load_scan; a case folder
holding files is never replaced by accident."""
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
    # the same rule as RTK's (3.1e-4 here, float32 sums and plane lengths); the midpoint rule was held to 1e-2
    assert err < 2e-3, f"relative RMS {err:.4f} between our simulation and RTK Joseph"
    scan = load_scan(case)
    assert scan.source_format == "rtk" and scan.reference is not None
    assert np.allclose(scan.projections, ours)
    words = describe(scan)
    assert "RTK case" in words["description"] and words["summary"]["views"] == 5
    written = json.loads((case / "case.json").read_text())
    assert written["projector"] == "ctnerfrecon" and written["rule"] == "joseph"


def test_noise_level(ct, tmp_path):
    info = simulate_case(ct, tmp_path / "n", views=2, det=24, pitch=20.0, i0=1e4, voxel=9.0, seed=3)
    # Poisson noise on -log(counts / I0): about 1 / sqrt(I0 exp(-p)) per pixel, i.e. a few percent of the max
    assert 0.001 < info["noise_rel_rmse"] < 0.05
    scan = load_scan(tmp_path / "n" / "geometry.xml")
    assert scan.projections.min() >= -0.2


def test_a_case_folder_is_never_replaced_by_accident(ct, tmp_path):
    """A folder holding files is refused before any work; --overwrite replaces it whole; a simulation stopped
    part way (Ctrl-C) leaves neither the case nor its hidden partial folder behind."""
    from CTNeRFReconLib.formats.validate import ScanFormatError

    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("the user's own file")
    calls = []
    with pytest.raises(ScanFormatError, match="--overwrite"):
        simulate_case(ct, kept, views=2, det=16, pitch=20.0, i0=0, voxel=9.0, progress=lambda *a: calls.append(a))
    assert calls == [] and (kept / "notes.txt").read_text() == "the user's own file"

    simulate_case(ct, kept, views=3, det=16, pitch=20.0, i0=0, voxel=9.0, overwrite=True,
                  progress=lambda *a: calls.append(a))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert not (kept / "notes.txt").exists() and (kept / "projections.mha").exists()
    assert load_scan(kept).n_views == 3

    def stop(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate_case(ct, tmp_path / "stopped", views=3, det=16, pitch=20.0, i0=0, voxel=9.0, progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
