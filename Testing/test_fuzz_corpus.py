"""Hostile and broken input files: the fuzz regression corpus, and the classic attacks written out.

Every input in Testing/fuzz/corpus/<target>/ once crashed, hung or blew up a reader (see the .txt
beside it); replayed here it must end as a ScanFormatError naming a file of the case (or, for the
events log, load without raising). The explicit cases below are the attacks a fuzzer rarely builds
by chance: XML entity expansion and external entities, YAML tags and aliases, .npy object arrays,
headers announcing terabytes, and compressed data that would inflate past memory. Each must be
refused quickly, before the memory is allocated, with nothing run.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from CTNeRFReconLib.formats import ScanFormatError, load_scan
from CTNeRFReconLib.reference import load_reference

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
import fuzz_readers  # noqa: E402

ENTRIES = list(fuzz_readers.corpus_entries())


@pytest.mark.parametrize("target,path", ENTRIES, ids=[f"{t.name}/{p.name}" for t, p in ENTRIES])
def test_corpus_input_is_refused_cleanly(target, path):
    t0 = time.monotonic()
    outcome, info = fuzz_readers.replay_one(target, path.read_bytes(), timeout=20)
    assert outcome != fuzz_readers.Outcome.FINDING, info
    if target.name != "events":
        assert outcome == fuzz_readers.Outcome.REFUSED
    assert time.monotonic() - t0 < 20


def test_every_target_accepts_its_own_seeds():
    for target in fuzz_readers.TARGETS.values():
        for seed in target.seeds():
            outcome, info = fuzz_readers.replay_one(target, seed)
            assert outcome == fuzz_readers.Outcome.OK, (target.name, info)


# -- the classic attacks ---------------------------------------------------------------------------
def _refused(fn, *args, field=None, words=(), seconds=10.0):
    t0 = time.monotonic()
    with pytest.raises(ScanFormatError) as info:
        fn(*args)
    err = info.value
    assert time.monotonic() - t0 < seconds
    assert err.fix and str(err).startswith(f"{err.file}: field '{err.field}': ")
    if field is not None:
        assert field in err.field, err
    for w in words:
        assert w in str(err), err
    return err


def _rtk_case(tmp_path, xml_text: str) -> Path:
    target = fuzz_readers.TARGETS["rtk_xml"]
    target.setup(tmp_path)
    (tmp_path / "geometry.xml").write_text(xml_text)
    return tmp_path / "geometry.xml"


def test_xml_entity_expansion_is_refused(tmp_path):
    lol = ['<!ENTITY l0 "lol">'] + [f'<!ENTITY l{i} "{("&l%d;" % (i - 1)) * 10}">' for i in range(1, 10)]
    xml = ('<?xml version="1.0"?>\n<!DOCTYPE RTKThreeDCircularGeometry [' + "".join(lol) + ']>\n'
           '<RTKThreeDCircularGeometry version="3"><Projection><SourceToIsocenterDistance>&l9;'
           '</SourceToIsocenterDistance></Projection></RTKThreeDCircularGeometry>\n')
    path = _rtk_case(tmp_path, xml)
    _refused(load_scan, path, words=("entities",))


def test_xml_external_entities_are_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("500")
    xml = (f'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY ext SYSTEM "file://{secret}">]>\n'
           '<RTKThreeDCircularGeometry version="3"><Projection><SourceToIsocenterDistance>&ext;'
           '</SourceToIsocenterDistance></Projection></RTKThreeDCircularGeometry>\n')
    _refused(load_scan, _rtk_case(tmp_path, xml), words=("entities",))
    # a DOCTYPE naming an external DTD is not fetched either: the file is parsed on its own
    xml2 = fuzz_readers._rtk_xml_bytes().decode().replace("<!DOCTYPE RTKGEOMETRY>",
                                                          '<!DOCTYPE r SYSTEM "http://127.0.0.1:9/x.dtd">')
    scan = load_scan(_rtk_case(tmp_path, xml2))
    assert scan.n_views == 4


def _stack(tmp_path, name, text):
    np.save(tmp_path / "p.npy", fuzz_readers._proj())
    (tmp_path / name).write_text(text)
    return tmp_path / name


def test_yaml_python_tags_are_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    for text in (f"!!python/object/apply:os.system ['touch {marker}']\n",
                 f"projections: p.npy\ngeometry: !!python/object/apply:os.system ['touch {marker}']\n",
                 "projections: !!python/name:os.system\n"):
        _refused(load_scan, _stack(tmp_path, "scan.yaml", text), field="file")
    assert not marker.exists()


def test_yaml_alias_bombs_are_refused(tmp_path):
    lines = ["a0: &a0 [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    text = "\n".join(lines) + "\nprojections: p.npy\ngeometry: {type: circular, sid: 500, sdd: 800, angles_deg: *a8}\n"
    _refused(load_scan, _stack(tmp_path, "scan.yaml", text), words=("aliases",))
    # a few plain aliases, as yaml.safe_dump writes for shared lists, are fine
    text = ("v: &v [0, 1, 0]\nprojections: p.npy\ngeometry: {type: vectors, pixel_pitch: 2.0, det_v: [*v, *v, *v, *v], "
            "sources: [[0, 0, 500], [500, 0, 0], [0, 0, -500], [-500, 0, 0]], det_centers: [[0, 0, -300], "
            "[-300, 0, 0], [0, 0, 300], [300, 0, 0]], det_u: [[1, 0, 0], [0, 0, -1], [-1, 0, 0], [0, 0, 1]]}\n")
    with pytest.raises(ScanFormatError, match="unknown field"):  # 'v' is not in the schema: parsed, then checked
        load_scan(_stack(tmp_path, "scan.yaml", text))


def test_deeply_nested_json_is_refused(tmp_path):
    _refused(load_scan, _stack(tmp_path, "scan.json", "[" * 200000 + "]" * 200000), field="file")
    _refused(load_scan, _stack(tmp_path, "scan.json", '{"projections": "p.npy", "geometry": ' + "[" * 5000 + "]" * 5000
                               + "}"))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_npy_object_arrays_and_pickles_inside_npy_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    desc = json.dumps(fuzz_readers._stack_desc())
    (tmp_path / "scan.json").write_text(desc)
    arr = np.empty(4, dtype=object)
    arr[:] = [_Payload(marker)] * 4
    np.save(tmp_path / "p.npy", arr, allow_pickle=True)
    _refused(load_scan, tmp_path / "scan.json", field="projections", words=("Python objects",))
    # a record dtype, and a header that is not a dict
    np.save(tmp_path / "p.npy", np.zeros(4, dtype=[("a", "<f4"), ("b", "<i4")]))
    _refused(load_scan, tmp_path / "scan.json", field="projections")
    assert not marker.exists()


def _npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_headers_announcing_terabytes_are_refused_before_allocating(tmp_path):
    tmp_path.joinpath("scan.json").write_text(json.dumps(fuzz_readers._stack_desc()))
    (tmp_path / "p.npy").write_bytes(_npy_header((100000, 100000, 100000)) + b"\0" * 4096)
    _refused(load_scan, tmp_path / "scan.json", words=("announces",))
    rtk = tmp_path / "rtk"
    rtk.mkdir()
    fuzz_readers.TARGETS["mha"].setup(rtk)
    (rtk / "projections.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\n"
                                          b"ElementType = MET_FLOAT\nElementDataFile = LOCAL\n" + b"\0" * 4096)
    _refused(load_scan, rtk / "geometry.xml", field="projections", words=("announces", "refused before reading"))
    (rtk / "projections.mha").unlink()
    (rtk / "projections.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\n"
                                           b"encoding: raw\nendian: little\n\n" + b"\0" * 4096)
    _refused(load_scan, rtk / "geometry.xml", field="projections", words=("announces",))
    # the same as a --reference volume
    ref = tmp_path / "ref.nrrd"
    ref.write_bytes((rtk / "projections.nrrd").read_bytes())
    _refused(load_reference, ref, field="--reference", words=("announces",))


def test_a_data_file_that_is_a_device_is_refused(tmp_path):
    fuzz_readers.TARGETS["mha"].setup(tmp_path)
    (tmp_path / "projections.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 8 6 4\n"
                                               b"ElementType = MET_FLOAT\nElementDataFile = /dev/zero\n")
    _refused(load_scan, tmp_path / "geometry.xml", words=("not a regular file",))


def test_compressed_data_that_would_inflate_past_memory_is_refused(tmp_path):
    fuzz_readers.TARGETS["nrrd"].setup(tmp_path)
    zeros = gzip.compress(b"\0" * (1 << 20))
    # 6.4 GB announced by a few KB of gzip: more than deflate can inflate to (a bomb, or truncated)
    (tmp_path / "projections.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 2000 800 1000\n"
                                                b"encoding: gzip\nendian: little\n\n" + zeros)
    _refused(load_scan, tmp_path / "geometry.xml", field="projections", words=("inflate",))
    # and one announcing more than this machine's memory
    (tmp_path / "projections.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 40000 40000 4000\n"
                                                b"encoding: gzip\nendian: little\n\n" + zeros)
    _refused(load_scan, tmp_path / "geometry.xml", field="projections", words=("memory",))
    # a compressed MetaImage too
    (tmp_path / "projections.nrrd").unlink()
    (tmp_path / "projections.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 2000 800 1000\n"
                                               b"CompressedData = True\nCompressedDataSize = %d\n"
                                               b"ElementType = MET_FLOAT\nElementDataFile = LOCAL\n" % len(zeros)
                                               + zeros)
    _refused(load_scan, tmp_path / "geometry.xml", field="projections", words=("inflate",))


def test_pickles_with_exploding_shared_references_are_refused(tmp_path):
    leaf = [0.0] * 10
    for _ in range(12):  # 10^12 values once expanded, a few hundred bytes pickled
        leaf = [leaf] * 10
    d = fuzz_readers._naf_dict()
    d["train"]["angles"] = leaf
    path = tmp_path / "scan.pickle"
    path.write_bytes(pickle.dumps(d, protocol=4))
    assert path.stat().st_size < 100000
    _refused(load_scan, path, words=("more than",))


def test_recursive_yaml_aliases_are_refused(tmp_path):
    # an anchored value holding an alias to itself is a value without end (it once hung the alias count)
    for text in ("projections: p.npy\ngeometry:\n  det_v:\n  - &id001\n    - *id001\n",
                 "projections: p.npy\ngeometry: &g {type: circular, inner: *g}\n",
                 "? &k [*k]\n: 1\n"):
        _refused(load_scan, _stack(tmp_path, "scan.yaml", text), field="file", words=("itself",), seconds=2)


def _mha_case(tmp_path, header: bytes, data: bytes = b"\0" * 768) -> Path:
    fuzz_readers.TARGETS["mha"].setup(tmp_path)
    (tmp_path / "projections.mha").write_bytes(header + data)
    return tmp_path / "geometry.xml"


def test_image_headers_metaio_misreads_are_refused_before_reading(tmp_path):
    # NDims = -3 or 3333... made MetaIO loop or crash in native code: refused in our own header check
    good = (b"ObjectType = Image\nNDims = 3\nDimSize = 8 6 4\nElementType = MET_FLOAT\n"
            b"ElementDataFile = LOCAL\n")
    for bad, field in ((good.replace(b"NDims = 3", b"NDims = -3"), "NDims"),
                       (good.replace(b"NDims = 3", b"NDims = " + b"3" * 80), "NDims"),
                       (good.replace(b"NDims = 3", b"NDims = 3\nNDims = 2"), "NDims"),  # MetaIO takes the last
                       (good.replace(b"DimSize = 8 6 4", b"DimSize = 8 6"), "DimSize"),
                       (good.replace(b"NDims = 3\n", b"garbage\nNDims = 3\n"), "header")):  # glued to NDims
        _refused(load_scan, _mha_case(tmp_path, bad), field=f"projections.{field}", seconds=2)
    # a zlib stream that ends before the pixels do: MetaIO's inflate loop never ended on it
    stream = __import__("zlib").compress(b"\0" * 768)[:6]
    _refused(load_scan, _mha_case(tmp_path, good.replace(b"ElementType", b"CompressedData = True\nElementType"),
                                  stream), field="projections.CompressedData", words=("inflate",), seconds=2)
    nrrd = tmp_path / "projections.nrrd"
    (tmp_path / "projections.mha").unlink()
    nrrd.write_bytes(b"NRRD0004\ntype: float\ndimension: -3\nsizes: 8 6 4\nencoding: raw\nendian: little\n\n"
                     + b"\0" * 768)
    _refused(load_scan, tmp_path / "geometry.xml", field="projections.dimension", seconds=2)


def test_tiff_directory_loops_are_refused_before_reading(tmp_path):
    import struct

    target = fuzz_readers.TARGETS["tiff"]
    target.setup(tmp_path)
    data = bytearray(target.seeds()[0])
    offset = struct.unpack("<I", data[4:8])[0]
    n = struct.unpack("<H", data[offset:offset + 2])[0]
    next_at = offset + 2 + 12 * n
    data[next_at:next_at + 4] = struct.pack("<I", offset)  # the first directory names itself as the next one
    (tmp_path / "projections.tif").write_bytes(bytes(data))
    _refused(load_scan, tmp_path / "geometry.xml", field="projections.IFD", words=("loops",), seconds=2)
    data[next_at:next_at + 4] = struct.pack("<I", len(data) + 1000)  # a directory past the end
    (tmp_path / "projections.tif").write_bytes(bytes(data))
    _refused(load_scan, tmp_path / "geometry.xml", field="projections.IFD", words=("outside",), seconds=2)
    # a page with smaller samples than the first: ITK read it into the first page's layout and crashed
    data = bytearray(target.seeds()[0])
    second = struct.unpack("<I", data[next_at:next_at + 4])[0]
    for k in range(struct.unpack("<H", data[second:second + 2])[0]):
        at = second + 2 + 12 * k
        if struct.unpack("<H", data[at:at + 2])[0] == 258:
            data[at + 8:at + 10] = struct.pack("<H", 16)
    (tmp_path / "projections.tif").write_bytes(bytes(data))
    _refused(load_scan, tmp_path / "geometry.xml", field="projections.BitsPerSample", words=("page 2",), seconds=2)
