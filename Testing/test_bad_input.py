"""Every kind of bad input is refused before any work, naming the file, the field and the fix."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CTNeRFReconLib.formats import ScanFormatError, load_scan
from CTNeRFReconLib.formats.r2gaussian import write_r2gaussian
from CTNeRFReconLib.formats.rtk import geometry_to_rtk, write_rtk_geometry_xml
from CTNeRFReconLib.geometry import circular_geometry
from worker_case import write_with_bad_voxel

REPO = Path(__file__).resolve().parents[1]


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


def test_a_folder_whose_one_scan_file_is_broken_gets_that_files_error(tmp_path):
    """"No scan found" would hide what is wrong with the file meant as the scan."""
    (tmp_path / "geometry.xml").write_text("<RTKThreeDCircularGeometry><SourceToIsocenter")
    err = refused(tmp_path, "xml")
    assert "geometry.xml" in str(err) and "line 1" in str(err)
    (tmp_path / "geometry.xml").write_text("<Foo/>")
    assert "<Foo>" in str(refused(tmp_path, "root"))
    (tmp_path / "scan.json").write_text(json.dumps({"views": 3}))
    err = refused(tmp_path, "format")                               # two candidates: both named
    assert "geometry.xml" in str(err) and "scan.json" in str(err)
    (tmp_path / "geometry.xml").unlink()
    assert "scan.json" in str(refused(tmp_path, "geometry"))


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
    proj[2, 0, 0] = value  # 2 of the view's 48 pixels: more than dead pixels explain (test_dead_pixels.py)
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
    assert "view 1 is entirely zero" in str(err) and "--drop-views 1" in str(err)


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


# -- pickles that are broken or tampered with, rather than asking for a foreign name ------------------
def _naf_pickle(protocol=2) -> bytes:
    d = {"DSD": 1500.0, "DSO": 1000.0, "nDetector": [6, 8], "dDetector": [2.0, 2.0], "nVoxel": [4, 4, 4],
         "dVoxel": [1.0, 1.0, 1.0], "train": {"projections": good_proj(), "angles": np.arange(4.0)}}
    return pickle.dumps(d, protocol=protocol)


def _tampered_dtype_pickle() -> bytes:
    """A protocol-2 pickle naming only allowed things (numpy arrays and dtypes) whose dtype state is
    corrupted (three bytes changed): numpy's own unpickling of it crashed the process (SIGSEGV)."""
    data = _naf_pickle(2)
    plain_state = b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"  # (3, '<', None, None, None, -1, -1, 0)
    assert plain_state in data
    return data.replace(plain_state, b"NN\x86J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t", 1)


def test_tampered_dtype_state_is_refused_without_a_crash(tmp_path):
    path = tmp_path / "tampered.pickle"
    path.write_bytes(_tampered_dtype_pickle())
    # in a child process: a regression here is a segmentation fault, which must not take pytest along
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "CTNeRFReconLib", "info", str(path)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "numpy.dtype.__setstate__" in res.stderr and "Traceback" not in res.stderr
    # and here: numpy's shared float32 descriptor is untouched afterwards
    refused(path, "numpy.dtype.__setstate__")
    assert np.dtype("f4").__reduce__()[2] == (3, "<", None, None, None, -1, -1, 0)
    assert float(np.ones(3, np.float32).max()) == 1.0


def test_object_arrays_and_odd_dtypes_are_refused(tmp_path):
    path = tmp_path / "obj.pickle"
    path.write_bytes(pickle.dumps({"train": {"projections": np.array([1, "a"], dtype=object)}}))
    refused(path, "numpy.dtype('O")
    path.write_bytes(pickle.dumps({"train": {"projections": np.zeros(3, dtype=[("a", "f4"), ("b", "i4")])}}))
    refused(path, "numpy.dtype")


def test_plain_pickles_load_exactly_as_pickle_does(tmp_path):
    from CTNeRFReconLib.formats.safe_pickle import safe_load

    data = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "big_endian": np.arange(4, dtype=">i2"),
            "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)), "strided": np.arange(8)[::2],
            "empty": np.zeros((0, 5)), "text": np.array(["ab", "c"]), "bools": np.array([True, False]),
            "scalar": np.float64(2.5), "complex": np.complex64(1j), "raw": b"xyz", "no_bytes": b"",
            "plain": [1, 2.5, "s", None, True, (3, [4])], "nested": {"a": {"b": np.int16(7)}}}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pickle"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        ours, theirs = safe_load(path), pickle.loads(path.read_bytes())
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            got = ours[key]
            if isinstance(value, np.ndarray):
                assert got.dtype.str == value.dtype.str and got.shape == value.shape, (protocol, key)
                assert np.array_equal(got, value) and got.flags.writeable == value.flags.writeable, (protocol, key)
            else:
                assert got == value and type(got) is type(value), (protocol, key)


def test_corrupted_pickles_are_refused_cleanly(tmp_path):
    """Every truncation and a few hundred random byte changes: a ScanFormatError each time, never
    another exception, and numpy left intact."""
    import random

    path = tmp_path / "c.pickle"
    rng = random.Random(0)
    for protocol in (0, 2, 5):
        data = _naf_pickle(protocol)
        for cut in range(1, len(data), max(1, len(data) // 150)):
            path.write_bytes(data[:cut])
            with pytest.raises(ScanFormatError):
                load_scan(path)
        for _ in range(200):
            changed = bytearray(data)
            for _ in range(3):
                changed[rng.randrange(len(changed))] = rng.randrange(256)
            path.write_bytes(bytes(changed))
            try:
                load_scan(path)
            except ScanFormatError:
                pass
    assert np.dtype("f4").__reduce__()[2] == (3, "<", None, None, None, -1, -1, 0)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.pickle"
    path.write_bytes(_naf_pickle())
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make the read fail as it would for a user
        real = type(path).read_bytes

        def read_bytes(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(type(path), "read_bytes", read_bytes)
    err = refused(path, "file")
    assert "ermission" in str(err)
    path.chmod(0o644)
    d = tmp_path / "folder.xml"
    d.mkdir()
    refused(d, "format")  # a folder named like a file is searched, not opened


def test_shipped_reference_must_be_readable_and_finite(tmp_path):
    from worker_case import write_small_case

    case = write_small_case(tmp_path / "case")
    write_with_bad_voxel(case / "reference.nrrd", case / "reference.nrrd", (2, 3, 4), np.nan)
    err = refused(case, "reference")
    assert err.file.endswith("reference.nrrd") and "NaN" in str(err)
    (case / "reference.nrrd").write_bytes(b"NRRD0004\ntype: float\n")
    refused(case, "reference")


# -- the whole matrix through the command line: exit code 2, one `failed` event, no traceback ---------
@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    from worker_case import write_small_case

    return write_small_case(tmp_path_factory.mktemp("matrix") / "good")


def _copy_case(good, root):
    import shutil

    case = root / "case"
    shutil.copytree(good, case)
    return case


def _edit_stack(case, edit):
    img = sitk.ReadImage(str(case / "projections.mha"))
    arr = edit(sitk.GetArrayFromImage(img))
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
    out.SetSpacing(img.GetSpacing())
    out.SetOrigin(img.GetOrigin())
    sitk.WriteImage(out, str(case / "projections.mha"))
    return case


def _edit_xml(case, edit):
    xml = case / "geometry.xml"
    xml.write_text(edit(xml.read_text()))
    return case


def _set_distances(text, sid, sdd):
    import re

    text = re.sub(r"<SourceToIsocenterDistance>[^<]*<", f"<SourceToIsocenterDistance>{sid}<", text)
    return re.sub(r"<SourceToDetectorDistance>[^<]*<", f"<SourceToDetectorDistance>{sdd}<", text)


def _with_nan(a, value):
    """A tenth of view 3's rows without values: more than a panel's dead lines (MAX_DEFECT_FRACTION)."""
    a = a.copy()
    a[3, : max(1, a.shape[1] // 10)] = value
    return a


def _moved_reference(case, root):
    ref = sitk.ReadImage(str(case / "reference.nrrd"))
    ref.SetOrigin(tuple(o + 5000.0 for o in ref.GetOrigin()))  # e.g. a CT in patient coordinates
    sitk.WriteImage(ref, str(root / "moved.nrrd"))
    return root / "moved.nrrd"


def _nan_reference(case, root):
    return write_with_bad_voxel(case / "reference.nrrd", root / "nan_ref.nrrd", (1, 2, 3), np.inf)


def _pickle_file(root, data: bytes, name="scan.pickle"):
    (root / name).write_bytes(data)
    return root / name


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# name -> build(good_case, root) -> (data, extra argv, file named, field named)
MATRIX = {
    "unknown format": lambda g, r: ((r / "notes.txt").write_text("hello") and r / "notes.txt", [],
                                    r / "notes.txt", "format"),
    "empty folder": lambda g, r: ((r / "empty").mkdir() or r / "empty", [], r / "empty", "format"),
    "count mismatch": lambda g, r: (_edit_stack(_copy_case(g, r), lambda a: a[:20]), [],
                                    r / "case" / "projections.mha", "projections"),
    "NaN": lambda g, r: (_edit_stack(_copy_case(g, r), lambda a: _with_nan(a, np.nan)), [],
                         r / "case" / "projections.mha", "projections"),
    "inf": lambda g, r: (_edit_stack(_copy_case(g, r), lambda a: _with_nan(a, np.inf)), [],
                         r / "case" / "projections.mha", "projections"),
    "negative": lambda g, r: (_edit_stack(_copy_case(g, r), lambda a: -a), [],
                              r / "case" / "projections.mha", "projections"),
    "all zero": lambda g, r: (_edit_stack(_copy_case(g, r), lambda a: 0 * a), [],
                              r / "case" / "projections.mha", "projections"),
    "missing field": lambda g, r: (_edit_xml(_copy_case(g, r), lambda t: __import__("re").sub(
        r"<SourceToDetectorDistance>[^<]*</SourceToDetectorDistance>", "", t)), [],
        r / "case" / "geometry.xml", "SourceToDetectorDistance"),
    "detector before the isocentre": lambda g, r: (_edit_xml(_copy_case(g, r), lambda t: _set_distances(
        t, 1000, 800)), [], r / "case" / "geometry.xml", "SourceToDetectorDistance"),
    "source inside the volume": lambda g, r: (_edit_xml(_copy_case(g, r), lambda t: _set_distances(
        t, 50, 500)), [], r / "case" / "geometry.xml", "grid"),
    "source inside the reference": lambda g, r: (_edit_xml(_copy_case(g, r), lambda t: _set_distances(
        t, 50, 500)), ["--reference", g / "reference.nrrd"], g / "reference.nrrd", "--reference"),
    "reference in another frame": lambda g, r: (g, ["--reference", _moved_reference(g, r)],
                                                r / "moved.nrrd", "--reference"),
    "reference with NaN": lambda g, r: (g, ["--reference", _nan_reference(g, r)], r / "nan_ref.nrrd",
                                        "--reference"),
    "unreadable reference": lambda g, r: (g, ["--reference", g / "geometry.xml"], g / "geometry.xml",
                                          "--reference"),
    "truncated stack": lambda g, r: (_copy_case(g, r), [], r / "case" / "projections.mha", "projections"),
    "garbage stack": lambda g, r: (_copy_case(g, r), [], r / "case" / "projections.mha", "projections"),
    "truncated XML": lambda g, r: (_edit_xml(_copy_case(g, r), lambda t: t[: len(t) // 2]), [],
                                   r / "case" / "geometry.xml", "xml"),
    "truncated pickle": lambda g, r: (_pickle_file(r, _naf_pickle()[:300]), [], r / "scan.pickle", "pickle"),
    "pickle calling os.system": lambda g, r: (_pickle_file(r, pickle.dumps({"train": _Marker(r / "pwned")})), [],
                                              r / "scan.pickle", "system"),
    "pickle with a tampered dtype": lambda g, r: (_pickle_file(r, _tampered_dtype_pickle()), [], r / "scan.pickle",
                                                  "numpy.dtype.__setstate__"),
}


def _damage_stack(case, how):
    stack = case / "projections.mha"
    data = stack.read_bytes()
    stack.write_bytes(data[: len(data) // 2] if how == "truncated" else np.random.default_rng(1).bytes(4000))


def _named_field(message: str) -> str:
    """The field a refusal names: "FILE: field 'NAME': problem. Fix: ..." """
    import re

    found = re.search(r"field '(.+?)': ", message)
    return found.group(1) if found else ""


@pytest.mark.parametrize("name", list(MATRIX))
def test_every_bad_input_is_refused_by_the_command_line(name, small_case, tmp_path, capfd):
    from CTNeRFReconLib import cli

    data, extra, file, field = MATRIX[name](small_case, tmp_path)
    if name in ("truncated stack", "garbage stack"):
        _damage_stack(data, name.split()[0])
    run = tmp_path / "run"
    code = cli.main(["reconstruct", str(data), "--out", str(run), "--method", "fdk", "--device", "cpu",
                     *map(str, extra)])
    out, err = capfd.readouterr()
    assert code == 2, (name, out, err)
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [e["event"] for e in events] == ["failed"] and events[0]["kind"] == "bad_input", (name, out)
    message = events[0]["message"]
    assert str(file) in message and field in _named_field(message) and "Fix:" in message, (name, message)
    assert "Traceback" not in err and message in err, (name, err)
    assert sorted(p.name for p in run.iterdir()) == ["events.jsonl"], name  # no work was done
    assert not (tmp_path / "pwned").exists()
    if extra:
        return
    # `info` refuses the same data with the same message (and exit code), or notes an unusable grid
    code = cli.main(["info", str(data)])
    out, err = capfd.readouterr()
    if name == "source inside the volume":
        assert code == 0 and "the data's grid is unusable" in out
        return
    if name in ("NaN", "inf"):  # a view with nothing to fit: `info` names it and what leaves it out
        assert code == 0 and "views with nothing to reconstruct from" in out and "--drop-views 3" in out, out
        assert "view 3 has 8.3% of its pixels without a value" in out, out
        return
    assert code == 2 and "Traceback" not in err and str(file) in err and field in _named_field(err), (name, err)


def test_a_reader_stopped_by_a_signal_reads_again_and_never_blames_the_file(tmp_path):
    """Ctrl-C in a terminal (or a cancel's SIGTERM) can reach the reader's child process too: that child
    dies of the signal, which is not a crash of the reader on a corrupt file. A real child is sent SIGTERM
    while it reads; the image still comes back (read again once), and the file is not called corrupt."""
    import signal
    import sys
    import threading
    import time

    import psutil

    from CTNeRFReconLib.volume_io import read_input_image

    path = tmp_path / "stack.mha"
    pixels = np.random.default_rng(0).random((6, 20, 24)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(path))
    me = psutil.Process()
    stopped = []

    def stop_the_first_reader():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not stopped:
            for child in me.children():
                try:
                    if "-c" in child.cmdline() and str(path) in child.cmdline():
                        child.send_signal(signal.SIGTERM)
                        stopped.append(child.pid)
                        return
                except psutil.Error:
                    pass
            time.sleep(0.002)

    if not Path(sys.executable).name.lower().startswith("python"):
        pytest.skip("the reader runs in-process under an embedding application")
    watcher = threading.Thread(target=stop_the_first_reader)
    watcher.start()
    img = read_input_image(path, "projections", "write the stack again")
    watcher.join()
    assert stopped, "the reader's child process was never seen"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), pixels)
