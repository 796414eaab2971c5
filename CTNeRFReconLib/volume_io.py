"""Reading and writing volumes with their world geometry (SimpleITK), atomically.

The scanner frame is written as ITK's physical space, so a volume lands where the projections'
geometry says (and Slicer, which reads ITK files as LPS, shows it mirrored into RAS consistently).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .data import Volume
from .geometry import VolumeGrid


def volume_to_sitk(volume: Volume) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(volume.array, dtype=np.float32))
    img.SetSpacing(volume.grid.spacing_xyz)
    img.SetOrigin(volume.grid.origin_xyz)
    img.SetDirection(tuple(float(x) for x in volume.grid.direction.reshape(-1)))
    return img


def sitk_to_volume(img: sitk.Image, dtype=np.float32) -> Volume:
    grid = VolumeGrid(img.GetSize(), img.GetSpacing(), img.GetOrigin(),
                      np.asarray(img.GetDirection()).reshape(3, 3))
    return Volume(sitk.GetArrayFromImage(img).astype(dtype), grid)


def unreadable_reason(path: Path, exc: RuntimeError, what: str = "volume") -> str:
    """Why SimpleITK could not read `path` (it raised `exc`), in words for an error message: a header
    that reads while the pixels do not is a truncated file (or a detached data file that is missing)."""
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
    try:
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        info.ReadImageInformation()
    except RuntimeError:
        return f"cannot be read as {'an' if what[0] in 'aeiou' else 'a'} {what} ({reason})"
    return (f"its header reads ({'x'.join(map(str, info.GetSize()))} voxels) but its pixel data "
            "cannot: the file is truncated or its data file is missing")


DEFLATE_MAX_RATIO = 1100
"""zlib/gzip cannot inflate more than about 1032:1, so compressed data that announce more than this
many bytes per stored byte cannot be complete (a decompression bomb, or a truncated file)."""


def _pixel_bytes(reader: sitk.ImageFileReader) -> int:
    import re

    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bits = re.search(r"(\d+)-bit", name)
    size = int(bits.group(1)) // 8 if bits else 8
    if "complex" in name:
        size *= 2
    return max(1, size) * max(1, int(reader.GetNumberOfComponents()))


_HEADER_BYTES = set(range(32, 127)) | {9, 10, 13}

HEADER_DIMS = (2, 3, 4)
"""The number of axes a MetaImage (NDims) or NRRD (dimension) header may give: a 2D image, a 3D
stack or volume, a 3D vector volume. MetaIO loops or crashes on others (-3, 3333...)."""

MAX_AXIS_SIZE = 2**31 - 1
"""An axis length larger than this does not fit the readers' 32-bit integers."""

_META_KEY_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_META_KEYS = {k.lower(): k for k in ("NDims", "DimSize", "ElementDataFile", "ElementType", "CompressedData",
                                     "CompressedDataSize", "ElementNumberOfChannels", "HeaderSize", "BinaryData",
                                     "ElementSpacing", "ObjectType")}
"""MetaImage keys as MetaIO spells them: it compares keys case-sensitively, so 'ndims' is not NDims."""


def _check_text_header(path: Path, field: str, fix: str) -> tuple[dict, int | None]:
    """(fields with lower-cased keys, header length in bytes) of a MetaImage (.mha/.mhd) or NRRD
    (.nrrd/.nhdr) header, after refusing (ScanFormatError) any header SimpleITK could mis-read.

    Hand-written because SimpleITK must never see such a header: MetaIO loops or corrupts its heap
    in native code on NDims = -3 or 3333..., and reads a key repeated twice, or a line without
    'Key = value' (which it glues to the next key), differently from this check. So the header is
    parsed here strictly first: printable text, one 'Key = value' per line, each key once, NDims /
    dimension a whole number in HEADER_DIMS before the sizes, and exactly that many axis sizes."""
    from .formats.validate import ScanFormatError

    def refuse(sub: str, problem: str):
        raise ScanFormatError(path, f"{field}.{sub}", problem + "; it was refused before reading", fix)

    with open(path, "rb") as fh:
        head = fh.read(65536)
    name = path.name.lower()
    nrrd = head.startswith(b"NRRD")
    if nrrd:
        end = head.find(b"\n\n")
        if end < 0:
            end = head.find(b"\r\n\r\n")
        text = head[:end] if end >= 0 else head
        header_len = end + (2 if head[end:end + 2] == b"\n\n" else 4) if end >= 0 else None
        if end < 0 and not name.endswith(".nhdr") and len(head) == 65536:
            refuse("header", "its NRRD header has no end (no empty line) in its first 64 KiB")
    else:
        text, header_len, pos = head, None, 0
        for raw in head.split(b"\n"):
            pos += len(raw) + 1
            key = raw.split(b"=", 1)[0].split(b":", 1)[0].strip()
            if key == b"ElementDataFile":  # MetaIO's last key: the data follow it
                text, header_len = head[:pos], min(pos, len(head))
                break
        if header_len is None and not name.endswith(".mhd"):
            refuse("ElementDataFile", "its MetaImage header has no 'ElementDataFile = ...' line in its first "
                   "64 KiB (where the header ends and the data begin)")
    if not set(text) <= _HEADER_BYTES:
        bad = next(i for i, b in enumerate(text) if b not in _HEADER_BYTES)
        refuse("header", f"its header holds a byte that is not text (0x{text[bad]:02x} at byte {bad}) before "
               "the end of the header: the file is corrupt")
    out: dict[str, str] = {}
    seen: dict[str, tuple[str, int]] = {}   # normalised key -> (key as written, line number)
    lines = text.decode("ascii").split("\n")
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or (nrrd and (number == 1 or line.startswith("#"))):
            continue
        if nrrd:
            if ":=" in line:  # a key/value pair, free text
                continue
            if ":" not in line:
                continue  # not a field: teem refuses it with its own message
            key, value = line.split(":", 1)
            norm = key.strip().lower().replace(" ", "")  # teem: 'data file' and 'datafile' are one field
        else:
            cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
            if cut < 0:
                refuse("header", f"line {number} of its header ({line[:40]!r}) is not 'Key = value' (MetaIO would "
                       "read it as the start of the next key)")
            key, value = line[:cut], line[cut + 1:]
            if not key.strip() or not set(key.strip()) <= _META_KEY_CHARS:
                refuse("header", f"line {number} of its header starts with {key.strip()[:40]!r}, not a key name")
            norm = key.strip().lower()
            if norm in _META_KEYS and key.strip() != _META_KEYS[norm]:
                refuse(key.strip(), f"is written '{key.strip()}' (line {number}); MetaIO only reads "
                       f"'{_META_KEYS[norm]}'")
        key = key.strip()
        if norm in seen:
            refuse(key, f"is given twice in its header (lines {seen[norm][1]} and {number}); the image readers "
                   "do not agree on which one counts")
        seen[norm] = (key, number)
        out[key.lower()] = value.strip()
    dims_key, sizes_key = ("dimension", "sizes") if nrrd else ("ndims", "dimsize")
    dims_name, sizes_name = ("dimension", "sizes") if nrrd else ("NDims", "DimSize")
    if dims_key not in out:
        refuse(dims_name, f"its header has no {dims_name} (the number of axes)")
    if out[dims_key] not in tuple(str(d) for d in HEADER_DIMS):
        refuse(dims_name, f"is {out[dims_key][:40]!r}; it must be a whole number from {HEADER_DIMS[0]} to "
               f"{HEADER_DIMS[-1]} (the number of axes)")
    ndims = int(out[dims_key])
    if sizes_key not in out:
        refuse(sizes_name, "its header gives no axis sizes")
    if seen[sizes_key][1] < seen[dims_key][1]:
        refuse(dims_name, f"comes after {sizes_name} in its header; the readers need the number of axes first")
    sizes = out[sizes_key].split()
    if len(sizes) != ndims or not all(v.isdigit() and 0 < int(v) <= MAX_AXIS_SIZE for v in sizes):
        refuse(sizes_name, f"is {out[sizes_key][:60]!r}; it must be {ndims} whole numbers from 1 to {MAX_AXIS_SIZE} "
               f"({dims_name} = {ndims})")
    if not nrrd and "elementdatafile" not in out:
        refuse("ElementDataFile", "its header has no ElementDataFile (where the data are)")
    return out, header_len


TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8,
                   18: 8}
"""Bytes per value of each TIFF field type (TIFF 6.0, plus BigTIFF's 8-byte integers and IFD8)."""
MAX_TIFF_IFDS = 65536
"""Image directories (pages) a TIFF may chain: more than any projection stack has."""
MAX_TIFF_TAGS = 4096
"""Entries one TIFF directory may hold: writers put a few dozen."""
_TIFF_MAGIC = {b"II*\0": ("<", False), b"MM\0*": (">", False), b"II+\0": ("<", True), b"MM\0+": (">", True)}
_TIFF_INT_FORMATS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 16: "Q", 17: "q"}
_TIFF_LAYOUT = {254: ("NewSubfileType", (0,)), 255: ("SubfileType", None), 256: ("ImageWidth", None),
                257: ("ImageLength", None), 258: ("BitsPerSample", (1,)), 262: ("PhotometricInterpretation", None), 277: ("SamplesPerPixel", (1,)),
                284: ("PlanarConfiguration", (1,)), 322: ("TileWidth", None), 323: ("TileLength", None),
                339: ("SampleFormat", (1,))}
"""The tags that set how many bytes a page's pixels take, and which pages ITK counts as the stack
(the subfile types), with libtiff's defaults: ITK sizes its buffer for the whole stack from the
first page and from the pages it counts, so every page must agree with the first."""


def _check_tiff_structure(path: Path, field: str, fix: str):
    """Refuse (ScanFormatError) a TIFF whose directory chain is not sound: a directory outside the
    file, one visited twice (a loop), more than MAX_TIFF_IFDS of them, a tag whose values lie past
    the end of the file, or a page whose layout (size, bits and format of a sample, see _TIFF_LAYOUT)
    differs from the first page's.

    Hand-written with struct, before the bytes reach libtiff: SimpleITK's libtiff loops for ever in
    native code on a directory chain that points back to itself (nothing but killing the process
    stops it), and SimpleITK has corrupted its heap on directories that run past the end of the
    file, on a page whose samples are smaller than the first page's (it reads every page into a
    buffer laid out for the first) and on pages of mixed subfile types (it counts some, reads all).
    Only the chain and a few tag values are read here (a few hundred bytes a page), not the pixels."""
    import struct

    from .formats.validate import ScanFormatError

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head[:4] not in _TIFF_MAGIC:
            raise ScanFormatError(path, f"{field}.header", "is named as a TIFF but does not start with a TIFF "
                                  "signature (II*, MM*, or BigTIFF's II+, MM+); it was refused before reading", fix)
        end, big = _TIFF_MAGIC[head[:4]]

        def refuse(sub: str, problem: str):
            raise ScanFormatError(path, f"{field}.{sub}", f"{problem} (the file holds {size} bytes): the TIFF is "
                                  "corrupt; it was refused before reading", fix)

        if big:
            if len(head) < 16 or struct.unpack(end + "HH", head[4:8]) != (8, 0):
                refuse("header", "its BigTIFF header is not 'offset size 8, reserved 0'")
            offset = struct.unpack(end + "Q", head[8:16])[0]
            count_fmt, entry_fmt, next_fmt, inline, first = "Q", "HHQ8s", "Q", 8, 16
        else:
            if len(head) < 8:
                refuse("header", "its header is cut short")
            offset = struct.unpack(end + "I", head[4:8])[0]
            count_fmt, entry_fmt, next_fmt, inline, first = "H", "HHI4s", "I", 4, 8
        count_len, next_len = struct.calcsize(count_fmt), struct.calcsize(next_fmt)
        entry_len = struct.calcsize(end + entry_fmt)
        if offset == 0:
            refuse("IFD", "it has no image directory (its first directory offset is 0)")
        seen: dict[int, int] = {}  # directory offset -> its page number
        first_layout = None
        while offset:
            page = len(seen) + 1
            if offset in seen:
                refuse("IFD", f"its image directory {page} is directory {seen[offset]} again (byte {offset}): the "
                       "directory chain loops")
            if len(seen) >= MAX_TIFF_IFDS:
                refuse("IFD", f"it chains more than {MAX_TIFF_IFDS} image directories")
            if offset < first or offset + count_len > size:
                refuse("IFD", f"its image directory {page} is said to be at byte {offset}, outside the file")
            seen[offset] = page
            fh.seek(offset)
            n = struct.unpack(end + count_fmt, fh.read(count_len))[0]
            if n == 0 or n > MAX_TIFF_TAGS:
                refuse("IFD", f"its image directory {page} (byte {offset}) says it has {n} entries")
            block_end = offset + count_len + n * entry_len + next_len
            if block_end > size:
                refuse("IFD", f"its image directory {page} (byte {offset}, {n} entries) runs to byte {block_end}, "
                       "past the end of the file")
            block = fh.read(n * entry_len + next_len)
            layout = {tag: default for tag, (_, default) in _TIFF_LAYOUT.items()}
            for tag, kind, count, raw in struct.iter_unpack(end + entry_fmt, block[:n * entry_len]):
                nbytes = TIFF_TYPE_BYTES.get(kind, 0) * count  # unknown types: libtiff skips the entry
                where = struct.unpack(end + ("Q" if big else "I"), raw)[0]
                if nbytes > inline and where + nbytes > size:
                    refuse(f"tag {tag}", f"tag {tag} of image directory {page} announces {count} values "
                           f"({nbytes} bytes) at byte {where}, past the end of the file")
                if tag in _TIFF_LAYOUT:
                    name = _TIFF_LAYOUT[tag][0]
                    if kind not in _TIFF_INT_FORMATS or count == 0 or count > 16:
                        refuse(name, f"{name} (tag {tag}) of image directory {page} is not a short list of whole "
                               f"numbers (type {kind}, {count} values)")
                    if nbytes > inline:
                        here = fh.tell()
                        fh.seek(where)
                        raw = fh.read(nbytes)
                        fh.seek(here)
                    layout[tag] = struct.unpack(end + _TIFF_INT_FORMATS[kind] * count, raw[:nbytes])
            for tag in (256, 257):
                if not layout[tag] or layout[tag][0] == 0:
                    refuse(_TIFF_LAYOUT[tag][0], f"image directory {page} has no {_TIFF_LAYOUT[tag][0]} "
                           f"(tag {tag}, required)")
            if first_layout is None:
                first_layout = layout
            else:
                for tag, (name, _) in _TIFF_LAYOUT.items():
                    if layout[tag] != first_layout[tag]:
                        refuse(name, f"page {page} has {name} {layout[tag]}, page 1 {first_layout[tag]}: a stack's "
                               "pages must share one layout (size, sample type, subfile type)")
            offset = struct.unpack(end + next_fmt, block[n * entry_len:])[0]


def _check_metaimage_inflates(data_path: Path, offset: int, stored: int, announced: str | None, want: int,
                              path: Path, field: str, fix: str):
    """Refuse MetaImage compressed data that do not inflate to the `want` bytes of pixels.

    Why: MetaIO's inflate loop never ends on a zlib stream that stops (truncated, or cut short by a
    small CompressedDataSize) before the pixels are complete, and no signal stops native code. So the
    stream is inflated here first, in chunks (nothing kept), as MetaIO would (zlib or gzip header,
    CompressedDataSize bytes when given, else the rest of the file); it costs one extra inflation."""
    import zlib

    from .formats.validate import ScanFormatError

    def refuse(sub: str, problem: str):
        raise ScanFormatError(path, f"{field}.{sub}", problem + "; it was refused before reading", fix)

    length = stored
    if announced is not None:
        if not announced.isdigit() or int(announced) == 0:
            refuse("CompressedDataSize", f"is {announced[:40]!r}; it must be a whole number of bytes")
        if int(announced) > stored:
            refuse("CompressedDataSize", f"announces {announced} bytes of compressed data but the file holds {stored}")
        length = int(announced)
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or gzip header, as MetaIO accepts
    got, left, chunk = 0, length, b""
    try:
        with open(data_path, "rb") as fh:
            fh.seek(offset)
            while got < want and not inflater.eof:
                chunk = inflater.unconsumed_tail
                if not chunk:
                    if left <= 0:
                        break
                    chunk = fh.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    left -= len(chunk)
                got += len(inflater.decompress(chunk, 1 << 24))
    except zlib.error as exc:
        refuse("CompressedData", f"its compressed data are corrupt ({exc}) after {got} of the {want} bytes of pixels")
    if got < want:
        refuse("CompressedData", f"its compressed data ({length} bytes) inflate to {got} bytes, not the {want} bytes "
               "of pixels its header announces: the file is truncated or corrupt")


def check_image_header(path, field: str, fix: str, what: str = "volume", headroom: int = 8):
    """Refuse, before any pixel is allocated, an image whose header announces more data than the
    file can hold (truncated, or a decompression bomb) or than this machine's memory can take.

    `headroom` is the bytes per voxel the readers need on top of the file's own (a float32 cast and
    the numpy copy). MetaImage and NRRD headers, and TIFF directory chains, are first checked here
    by hand (SimpleITK loops or crashes in native code on some corrupt ones, see _check_text_header
    and _check_tiff_structure); other files whose header SimpleITK cannot read are left to the
    reader's own message.
    """
    import psutil

    from .formats.validate import ScanFormatError

    path = Path(path)
    name = path.name.lower()
    head = header_len = None
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic in _TIFF_MAGIC or name.endswith((".tif", ".tiff")):
            _check_tiff_structure(path, field, fix)
        if name.endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
            head, header_len = _check_text_header(path, field, fix)
    except OSError:
        return  # missing or unreadable: the reader says so
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return
    size = [int(s) for s in reader.GetSize()]
    voxels = 1
    for s in size:
        voxels *= max(0, s)
    data_bytes = voxels * _pixel_bytes(reader)
    need = data_bytes + voxels * headroom
    shape = " x ".join(map(str, size))
    avail = psutil.virtual_memory().available
    if need > avail:
        raise ScanFormatError(path, field, f"its header announces a {shape} {what} ({data_bytes / 2**30:.3g} GiB of "
                              f"data, about {need / 2**30:.3g} GiB to read) but {avail / 2**30:.1f} GiB of memory "
                              "are available; it was refused before reading", fix)
    stored = path.stat().st_size
    if head is not None:
        if name.endswith((".mha", ".nrrd")) and header_len is not None:
            stored = max(0, stored - header_len)
        if name.endswith((".mha", ".mhd")):
            compressed = head.get("compresseddata", "false").lower() == "true"
            datafile = head.get("elementdatafile", "LOCAL")
            local = datafile.upper() == "LOCAL"
            bomb_check = compressed
        else:
            encoding = head.get("encoding", "raw").lower()
            compressed = encoding not in ("raw",)
            datafile = head.get("data file", head.get("datafile", ""))
            local = datafile == ""
            bomb_check = encoding in ("gzip", "gz")
        if not local:
            if datafile.upper().startswith("LIST") or "%" in datafile or " " in datafile:
                return  # a list or pattern of slice files: SimpleITK checks each
            target = (path.parent / datafile) if not Path(datafile).is_absolute() else Path(datafile)
            try:
                st = target.stat()
            except OSError:
                raise ScanFormatError(path, field, f"its data file '{datafile[:80]}' is missing", fix) from None
            import stat as stat_mod

            if not stat_mod.S_ISREG(st.st_mode):
                raise ScanFormatError(path, field, f"its data file '{datafile}' is not a regular file (a device, "
                                      "pipe or folder); refused", fix)
            stored = st.st_size
        if compressed:
            if bomb_check and data_bytes > DEFLATE_MAX_RATIO * stored + 65536:
                raise ScanFormatError(path, field, f"its header announces a {shape} {what} ({data_bytes / 2**20:.4g} MiB) "
                                      f"but its compressed data ({stored} bytes) cannot inflate to that much: the "
                                      "file is truncated or a decompression bomb; it was refused before reading", fix)
            if name.endswith((".mha", ".mhd")):
                _check_metaimage_inflates(path if local else target, header_len if local else 0, stored,
                                          head.get("compresseddatasize"), data_bytes, path, field, fix)
        elif data_bytes > stored:
            raise ScanFormatError(path, field, f"its header announces a {shape} {what} ({data_bytes} bytes of data) "
                                  f"but the file holds {stored} bytes: it is truncated (or its header is wrong)", fix)
    elif name.endswith((".nii", ".hdr", ".img")) and data_bytes > stored + (path.with_suffix(".img").stat().st_size
                                                                         if name.endswith(".hdr") and path.with_suffix(".img").exists() else 0):
        raise ScanFormatError(path, field, f"its header announces a {shape} {what} ({data_bytes} bytes of data) "
                              f"but the file holds {stored} bytes: it is truncated (or its header is wrong)", fix)
    elif name.endswith(".nii.gz") and data_bytes > DEFLATE_MAX_RATIO * stored + 65536:
        raise ScanFormatError(path, field, f"its header announces a {shape} {what} but its compressed data "
                              f"({stored} bytes) cannot inflate to {data_bytes} bytes: truncated, or a "
                              "decompression bomb; it was refused before reading", fix)


IN_PROCESS_ENV = "CTNERF_READ_IN_PROCESS"
"""Set to 1 to read input images in this process (no crash isolation; the fuzzer uses it to reach
the native readers' crashes, which the product then refuses)."""

READ_TIMEOUT_ENV = "CTNERF_READ_TIMEOUT"
"""Seconds an input image may take to read (default 10 s + 1 s per 2 MB of file)."""

_CHILD = r"""
import json, sys
import numpy as np
import SimpleITK as sitk
from CTNeRFReconLib.formats.validate import ScanFormatError
from CTNeRFReconLib.volume_io import check_image_header, unreadable_reason
path, field, fix, what, as_float = sys.argv[1:]
try:
    check_image_header(path, field, fix, what)
    img = sitk.ReadImage(path, sitk.sitkFloat32) if as_float == "1" else sitk.ReadImage(path)
except ScanFormatError as e:
    print(json.dumps({"kind": "refused", "file": e.file, "field": e.field, "problem": e.problem, "fix": e.fix}))
    sys.exit(0)
except RuntimeError as e:
    print(json.dumps({"kind": "unreadable", "problem": unreadable_reason(path, e, what)}))
    sys.exit(0)
arr = np.ascontiguousarray(sitk.GetArrayFromImage(img))
print(json.dumps({"kind": "ok", "components": img.GetNumberOfComponentsPerPixel(), "spacing": img.GetSpacing(),
                  "origin": img.GetOrigin(), "direction": img.GetDirection(), "dtype": arr.dtype.str,
                  "shape": arr.shape}), flush=True)
sys.stdout.buffer.write(memoryview(arr).cast("B"))
sys.stdout.buffer.flush()
"""


_STOP_SIGNALS = frozenset(int(getattr(signal, name)) for name in ("SIGTERM", "SIGINT", "SIGHUP")
                          if hasattr(signal, name))
"""Signals that stop a reader child from outside (a cancel, Ctrl-C, a closed terminal): not a crash."""


def read_input_image(path, field: str, fix: str, what: str = "volume", as_float: bool = True) -> sitk.Image:
    """An input image (data, reference, flat/dark fields): header checked, then read in a child
    process, so that a native reader crash on a corrupt file (SimpleITK's MetaIO and TIFF readers
    have corrupted their heap on fuzzed files) is a refusal naming the file, not a dead worker.
    Raises ScanFormatError for a refused or unreadable file."""
    import json
    import subprocess

    from .formats.validate import ScanFormatError

    path = Path(path)
    exe = Path(sys.executable or "").name.lower()
    # inside an application that embeds Python (3D Slicer), sys.executable is the application, not a
    # Python that runs `-c`: read in-process there (the worker that reconstructs is a real Python)
    # (the slicer-core package is importable in a plain Python too: only the application has slicer.app)
    embedded = not exe.startswith("python") or getattr(sys.modules.get("slicer"), "app", None) is not None
    if os.environ.get(IN_PROCESS_ENV) == "1" or embedded:
        check_image_header(path, field, fix, what)
        try:
            return sitk.ReadImage(str(path), sitk.sitkFloat32) if as_float else sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise ScanFormatError(path, field, unreadable_reason(path, exc, what), fix) from None
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root] + [q for q in os.environ.get("PYTHONPATH", "")
                                                                        .split(os.pathsep) if q]))
    # the pixels come back through the pipe (no temporary file: a full disk must not stop reading); a
    # reader stuck in native code (SimpleITK's TIFF reader loops on some corrupt files) is stopped
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    limit = float(os.environ.get(READ_TIMEOUT_ENV, 0) or 10.0 + size / 2e6)  # 10 s + 2 MB/s
    for _ in range(2):
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), field, fix, what, "1" if as_float else "0"],
                                  capture_output=True, env=env, timeout=limit)
        except subprocess.TimeoutExpired:
            raise ScanFormatError(path, field, f"reading it as an image did not end within {limit:.0f} s (the reader "
                                  f"is stuck on it): the file is corrupt; it was refused", fix + f"; if the file is "
                                  f"fine but the disk is slow, set {READ_TIMEOUT_ENV} to more seconds") from None
        if -proc.returncode not in _STOP_SIGNALS:
            break
        # stopped from outside, not crashed: Ctrl-C in a terminal reaches the whole foreground process
        # group, a cancel's SIGTERM may too. The worker's own handler has taken the request (it stops at
        # its next check); the file is not to blame, so it is read again, once.
    else:
        raise InterruptedError(f"reading {path} was stopped twice by {signal.Signals(-proc.returncode).name} "
                               "(a cancel or Ctrl-C while loading); the file was not refused: run again")
    head, _, pixels = proc.stdout.partition(b"\n")
    stderr = proc.stderr.decode("utf-8", "replace")
    lines = [head.decode("utf-8", "replace")] if head.startswith(b"{") else []
    if proc.returncode != 0 or not lines:
        if proc.returncode < 0:
            try:
                why = f"killed by {signal.Signals(-proc.returncode).name}"
            except ValueError:
                why = f"killed by signal {-proc.returncode}"
        else:
            tail = " ".join(stderr.strip().splitlines()[-1:])[:160]
            why = f"exit status {proc.returncode}" + (f": {tail}" if tail else "")
        if "MemoryError" in stderr or "bad_alloc" in stderr:
            why = "it needs more memory than is available"
        raise ScanFormatError(path, field, f"the image reader crashed on it ({why}): the file is corrupt; it was "
                              "refused and this run is unharmed", fix)
    result = json.loads(lines[-1])
    if result["kind"] == "refused":
        raise ScanFormatError(result["file"], result["field"], result["problem"], result["fix"])
    if result["kind"] == "unreadable":
        raise ScanFormatError(path, field, result["problem"], fix)
    dtype, shape = np.dtype(result["dtype"]), tuple(result["shape"])
    if len(pixels) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise ScanFormatError(path, field, "the image reader returned fewer pixels than the header announces", fix)
    arr = np.frombuffer(pixels, dtype=dtype).reshape(shape)
    img = sitk.GetImageFromArray(arr, isVector=result["components"] > 1)
    img.SetSpacing(result["spacing"])
    img.SetOrigin(result["origin"])
    img.SetDirection(result["direction"])
    return img


def _read_image(path: Path, field: str = "volume", fix: str = "give a 3D NRRD, MHA or NIfTI volume",
                isolated: bool = False) -> tuple[sitk.Image | None, str]:
    """(image, "") or (None, what is wrong with the file). `isolated`: an input file, read with
    read_input_image (refusals raise ScanFormatError)."""
    if isolated:
        img = read_input_image(path, field, fix, as_float=False)
    else:
        check_image_header(path, field, fix)
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            return None, unreadable_reason(path, exc)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        return None, (f"expected a 3D scalar volume, got {img.GetDimension()}D with "
                      f"{img.GetNumberOfComponentsPerPixel()} components per voxel")
    return img, ""


def read_volume(path, dtype=np.float32) -> Volume:
    """Any SimpleITK-readable volume (NRRD, MHA, NIfTI, ...), with its world geometry."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: volume file not found; check the path")
    img, problem = _read_image(path)
    if img is None:
        raise ValueError(f"{path}: {problem}; give a 3D NRRD, MHA or NIfTI volume")
    return sitk_to_volume(sitk.Cast(img, sitk.sitkFloat32) if dtype == np.float32 else img, dtype)


def read_input_volume(path, field: str, fix: str) -> Volume:
    """read_volume for input data (a reference CT, a ground truth shipped with a scan): a missing or
    unreadable file, or a NaN/infinite voxel, is a ScanFormatError naming the file, the field and the fix."""
    from .formats.validate import ScanFormatError

    path = Path(path)
    if not path.is_file():
        raise ScanFormatError(path, field, "not found" if not path.exists() else "is not a file", fix)
    img, problem = _read_image(path, field, fix, isolated=True)
    if img is None:
        raise ScanFormatError(path, field, problem, fix)
    volume = sitk_to_volume(sitk.Cast(img, sitk.sitkFloat32))
    bad = int(np.count_nonzero(~np.isfinite(volume.array)))
    if bad:
        raise ScanFormatError(path, field, f"has {bad} NaN or infinite voxels", fix)
    return volume


def _plain_mode(requested: int) -> int:
    """The permissions a plainly created file (0o666) or folder (0o777) gets: the request less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return requested & ~mask


_FILE_MODE = _plain_mode(0o666)
FOLDER_MODE = _plain_mode(0o777)
"""What a folder made with mkdir gets; a tempfile.mkdtemp folder renamed into place is given it (mkdtemp's
0700 would hide the folder from other users)."""


class RunFolderWriteError(OSError):
    """A result could not be written (disk full, a file size limit, a read-only folder, I/O error).

    The file it was replacing is left as it was: the last complete snapshot, volume or checkpoint."""


_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


def is_disk_error(exc: BaseException) -> bool:
    """An OSError that says the disk (not the program) failed: no space, size limit, read-only, I/O."""
    return isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS


def write_failure(path, exc: BaseException) -> RunFolderWriteError:
    """The error to raise when writing `path` failed with `exc`, in words, with the fix."""
    path = Path(path)
    reason = " ".join((getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).split())
    if len(reason) > 160:
        reason = reason[:160] + "..."
    try:
        free = shutil.disk_usage(path.parent).free
        room = f"; {free / 2**20:.1f} MiB free on that disk"
    except OSError:
        room = ""
    err = RunFolderWriteError(getattr(exc, "errno", None) or errno.EIO,
                              f"{path}: could not be written ({reason}{room}): the disk is full, a file size "
                              "limit was reached or the folder is not writable. The previous complete file is "
                              "kept. Fix: free disk space (or raise the limit) and run again with --resume, or "
                              "choose another --out")
    err.filename = str(path)
    return err


def _fsync_path(path, directory: bool = False):
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some systems cannot open a folder: its rename is then as durable as they allow
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path, write_fn) -> Path:
    """Write through `write_fn(tmp_path)` to a temporary name in the same folder, fsync, then rename.

    A reader polling `path` sees either the previous complete file or the new complete file, and
    a crash (SIGKILL, power loss) at any moment leaves one of the two: the data are on disk before
    the rename, and the folder entry after it. The temporary name keeps the extension so that
    writers that pick a format by suffix work; it starts with '.' and is removed on failure.
    The file ends with the usual permissions (mkstemp's private 0600 would hide it from other users).
    A write that fails for lack of space or permission is a RunFolderWriteError naming the file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix="".join(path.suffixes) or ".tmp",
                                   dir=path.parent)
    except OSError as exc:
        raise write_failure(path, exc) from None
    os.close(fd)
    try:
        try:
            write_fn(tmp)
            _fsync_path(tmp)
            os.chmod(tmp, _FILE_MODE)
        except (OSError, RuntimeError) as exc:  # ITK and torch report a short write as RuntimeError
            raise write_failure(path, exc) from None
        os.replace(tmp, path)
    except BaseException:
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_path(path.parent, directory=True)
    return path


def write_volume(volume: Volume, path, compress: bool = True) -> Path:
    """Atomically write a volume (float32) with origin, spacing and direction."""
    img = volume_to_sitk(volume)
    return atomic_write(path, lambda tmp: sitk.WriteImage(img, str(tmp), compress))


def resample_to_grid(volume: Volume, grid: VolumeGrid, default: float = 0.0,
                     interpolator=sitk.sitkLinear) -> Volume:
    """Resample a volume onto another grid by world coordinates (as ../shared/bench/score.py)."""
    ref = sitk.Image([int(s) for s in grid.shape_xyz], sitk.sitkFloat32)
    ref.SetSpacing(grid.spacing_xyz)
    ref.SetOrigin(grid.origin_xyz)
    ref.SetDirection(tuple(float(x) for x in grid.direction.reshape(-1)))
    out = sitk.Resample(volume_to_sitk(volume), ref, sitk.Transform(), interpolator, float(default))
    return Volume(sitk.GetArrayFromImage(out).astype(np.float32), grid)
