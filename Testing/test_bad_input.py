"""Every kind of bad input is refused before any work, naming the file, the field and the fix."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import SimpleITK as sitk

from CTNeRFReconLib.formats import ScanFormatError, load_scan
from CTNeRFReconLib.formats.r2gaussian import write_r2gaussian
from CTNeRFReconLib.formats.rtk import geometry_to_rtk, write_rtk_geometry_xml
from CTNeRFReconLib.geometry import circular_geometry


def good_proj(n=4, rows=6, cols=8):
    return np.random.default_rng(0).uniform(0.1, 2.0, (n, rows, cols)).astype(np.float32)


def stack_case(tmp_path, proj=None, name="scan.json", **changes):
    proj = good_proj() if proj is None else proj
    np.save(tmp_path / "p.npy", proj)
    desc = {"projections": "p.npy",
            "geometry": {"type": "circular", "sid": 500, "sdd": 800, "angles_deg": [0, 90, 180, 270][:len(proj)],
                         "pixel_pitch": [2.0, 2.0]}}
    for k, v in changes.items():
        if k.startswith("geometry."):
            desc["geometry"][k.split(".", 1)[1]] = v
        else:
            desc[k] = v
    (tmp_path / name).write_text(json.dumps(desc))
    return tmp_path / name


def refused(path, field_part, **kw):
    with pytest.raises(ScanFormatError) as info:
        load_scan(path, **kw)
    err = info.value
    assert field_part in err.field, f"field {err.field!r} does not name {field_part!r}: {err}"
    assert err.file and err.fix and str(err.file) in str(err)
    return err


def test_good_stack_loads(tmp_path):
    scan = load_scan(stack_case(tmp_path))
    assert scan.n_views == 4 and scan.source_format == "stack+json"


def test_unknown_format(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    refused(p, "format")
    refused(tmp_path, "format")


def test_missing_path(tmp_path):
    refused(tmp_path / "nope.json", "path")


def test_count_mismatch(tmp_path):
    p = stack_case(tmp_path, **{"geometry.angles_deg": [0, 90, 180]})
    err = refused(p, "angles_deg")
    assert "3 angles for 4" in str(err)


@pytest.mark.parametrize("value,what", [(np.nan, "NaN"), (np.inf, "NaN")])
def test_nan_inf(tmp_path, value, what):
    proj = good_proj()
    proj[2, 3, 4] = value
    err = refused(stack_case(tmp_path, proj), "projections")
    assert what in str(err) and "view 2" in str(err)


def test_negative_beyond_noise(tmp_path):
    proj = good_proj()
    proj[0, 0, 0] = -0.1  # noise level: accepted
    load_scan(stack_case(tmp_path, proj))
    proj[0, 0, 0] = -0.5
    refused(stack_case(tmp_path, proj), "projections")


def test_all_zero_and_zero_view(tmp_path):
    refused(stack_case(tmp_path, np.zeros((4, 6, 8), np.float32)), "projections")
    proj = good_proj()
    proj[1] = 0
    err = refused(stack_case(tmp_path, proj), "projections")
    assert "[1]" in str(err)


def test_intensities_not_declared(tmp_path):
    refused(stack_case(tmp_path, good_proj() * 1e4), "projections")


def test_intensities_converted(tmp_path):
    lines = good_proj()
    p = stack_case(tmp_path, (1e4 * np.exp(-lines)).astype(np.float32), kind="intensity", i0=1e4)
    assert np.allclose(load_scan(p).projections, lines, atol=1e-4)
    np.save(tmp_path / "flat.npy", np.full((6, 8), 2e4 + 100.0))
    p = stack_case(tmp_path, (2e4 * np.exp(-lines) + 100).astype(np.float32), kind="intensity",
                   flat="flat.npy", dark=100.0)
    assert np.allclose(load_scan(p).projections, lines, atol=1e-4)
    refused(stack_case(tmp_path, good_proj() * 10, kind="intensity"), "i0")
    np.save(tmp_path / "flat.npy", np.full((6, 8), 50.0))
    refused(stack_case(tmp_path, good_proj() * 10, kind="intensity", flat="flat.npy", dark=100.0), "flat")


def test_missing_and_unknown_fields(tmp_path):
    p = stack_case(tmp_path)
    desc = json.loads(p.read_text())
    del desc["geometry"]["sdd"]
    p.write_text(json.dumps(desc))
    refused(p, "geometry.sdd")
    refused(stack_case(tmp_path, geometry_typo=1), "geometry_typo")
    refused(stack_case(tmp_path, **{"geometry.sid_mm": 500}), "geometry.sid_mm")


def test_absurd_distances(tmp_path):
    refused(stack_case(tmp_path, **{"geometry.sid": 900}), "sdd")       # SID >= SDD
    refused(stack_case(tmp_path, **{"geometry.sid": -5}), "sid")
    grid = {"shape_xyz": [600, 10, 10], "spacing_xyz": [2, 2, 2], "origin_xyz": [-599, -9, -9]}
    err = refused(stack_case(tmp_path, grid=grid), "geometry")         # source inside the volume
    assert "inside" in str(err)


def test_wrong_shapes(tmp_path):
    refused(stack_case(tmp_path, good_proj()[0]), "projections")       # 2D
    refused(stack_case(tmp_path, **{"geometry.detector_shape": [8, 6]}), "detector_shape")
    d = {"projections": "p.npy", "geometry": {"type": "vectors", "sources": [[0, 0, 500]] * 3,
                                               "det_centers": [[0, 0, -300]] * 4, "det_u": [[1, 0, 0]] * 4,
                                               "det_v": [[0, 1, 0]] * 4, "pixel_pitch": 2.0}}
    np.save(tmp_path / "p.npy", good_proj())
    (tmp_path / "v.json").write_text(json.dumps(d))
    refused(tmp_path / "v.json", "geometry.sources")


def test_unreadable_and_truncated(tmp_path):
    p = stack_case(tmp_path)
    p.write_text(p.read_text()[:30])
    refused(p, "file")
    p = stack_case(tmp_path)
    data = (tmp_path / "p.npy").read_bytes()
    (tmp_path / "p.npy").write_bytes(data[: len(data) // 2])
    refused(p, "projections")
    empty = tmp_path / "e.pickle"
    empty.write_bytes(b"")
    refused(empty, "file")
    trunc = tmp_path / "t.pickle"
    trunc.write_bytes(pickle.dumps({"train": {"projections": good_proj()}})[:200])
    refused(trunc, "pickle")


def test_rtk_mismatch_and_bad_stack(tmp_path):
    g = circular_geometry(1000, 1500, np.radians([0, 90, 180]), (6, 8), (2.0, 2.0), axis="y")
    params, _ = geometry_to_rtk(g)
    write_rtk_geometry_xml(params, tmp_path / "geometry.xml")
    sitk.WriteImage(sitk.GetImageFromArray(good_proj(4)), str(tmp_path / "projections.mha"))
    err = refused(tmp_path / "geometry.xml", "projections")
    assert "4 views" in str(err)
    (tmp_path / "projections.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")
    refused(tmp_path / "geometry.xml", "projections")
    (tmp_path / "projections.mha").unlink()
    refused(tmp_path / "geometry.xml", "projections")                 # no stack at all
    bad = (tmp_path / "geometry.xml").read_text().replace("<GantryAngle>90.0</GantryAngle>", "")
    (tmp_path / "geometry.xml").write_text(bad)
    sitk.WriteImage(sitk.GetImageFromArray(good_proj(3)), str(tmp_path / "projections.mha"))
    refused(tmp_path / "geometry.xml", "GantryAngle")
    (tmp_path / "geometry.xml").write_text(bad[:120])
    refused(tmp_path / "geometry.xml", "xml")                        # truncated XML


def test_naf_and_r2_bad_fields(tmp_path):
    d = {"DSD": 1500.0, "DSO": 1000.0, "nDetector": [6, 8], "dDetector": [2.0, 2.0], "nVoxel": [4, 4, 4],
         "dVoxel": [1.0, 1.0, 1.0], "train": {"projections": good_proj(), "angles": np.arange(3.0)}}
    (tmp_path / "a.pickle").write_bytes(pickle.dumps(d))
    refused(tmp_path / "a.pickle", "train.angles")
    d["train"]["angles"] = np.arange(4.0)
    d["nDetector"] = [8, 6]
    (tmp_path / "a.pickle").write_bytes(pickle.dumps(d))
    refused(tmp_path / "a.pickle", "nDetector")
    d["nDetector"] = [6, 8]
    d["DSO"] = 2000.0
    (tmp_path / "a.pickle").write_bytes(pickle.dumps(d))
    refused(tmp_path / "a.pickle", "DSD")
    del d["DSD"]
    (tmp_path / "a.pickle").write_bytes(pickle.dumps(d))
    refused(tmp_path / "a.pickle", "DSD")
    sc = {"mode": "cone", "DSD": 1500.0, "DSO": 1000.0, "nDetector": [6, 8], "sDetector": [12.0, 16.0],
          "nVoxel": [4, 4, 4], "sVoxel": [4.0, 4.0, 4.0]}
    write_r2gaussian(tmp_path / "r2", good_proj()[:, 0], [0.0] * 4, sc)   # 1D images
    refused(tmp_path / "r2", "proj_train[0]")
    sc.pop("sVoxel")
    write_r2gaussian(tmp_path / "r2b", good_proj(), np.arange(4.0), sc)
    refused(tmp_path / "r2b", "scanner.sVoxel")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"train": Evil(marker)}))
    err = refused(path, "system")
    assert "nothing was executed" in str(err)
    assert not marker.exists()
    # any other global, even harmless-looking, is refused too
    path.write_bytes(pickle.dumps({"train": {"projections": good_proj(), "angles": range(4)}}))
    refused(path, "range")
    assert not marker.exists()
