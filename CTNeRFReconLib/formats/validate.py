"""Checks shared by every format adapter: refuse bad input before any work, and say how to fix it.

Every refusal is a :class:`ScanFormatError` naming the file, the field and the fix, so that a user
who fed a wrong file learns what to change instead of getting a bad reconstruction later.
"""
from __future__ import annotations

import tokenize
from pathlib import Path

import numpy as np

from ..geometry import ConeBeamGeometry, VolumeGrid

NEGATIVE_TOLERANCE = 0.2
"""Line integrals down to -0.2 are accepted as noise.

Photon noise in air makes -log(I/I0) slightly negative (standard deviation 1/sqrt(I0): 0.03 at
I0 = 1e3, 0.01 at 1e4), so a few such values are normal; anything below -0.2 (transmission above
1.22) is not noise but wrongly signed or unnormalised data.
"""
INTENSITY_SUSPECT = 30.0
"""Line integrals above 30 (transmission e^-30) do not occur: such data are raw intensities."""
MAX_DEFECT_FRACTION = 0.02
"""Pixels without a value (NaN or infinity: a flat panel's dead pixels and lines, or a log taken of zero
counts) are taken as missing measurements up to this share of any view's pixels; `ScanData` then marks
and fills them (`defects`). A dead column of a 240-column panel is 0.4 % of a view; more than 2 % says the
view is broken, not the panel: a bad view (`ScanData.bad_views`), refused unless the user leaves it out
(`--drop-views`, the panel's Leave out views)."""


NO_BEAM_SHARE = 0.5
"""A view of intensities with more than this share of its pixels at or below the dark level saw no beam.
A scan that can be reconstructed at all has photons through most of each view (the floor's line integral
of 13.8 is 3 m of water); one whose body starves more than half of a view of photons would have nothing
to fit there either, and is named as such."""


class ScanFormatError(ValueError):
    """Bad scan input: carries the offending file, the field and the fix."""

    def __init__(self, file, field: str, problem: str, fix: str):
        self.file = str(file)
        self.field = str(field)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.file}: field '{self.field}': {problem}. Fix: {fix}")


def require(mapping: dict, key: str, file, fix: str | None = None, where: str = ""):
    """``mapping[key]``, or a ScanFormatError naming the missing field."""
    if not isinstance(mapping, dict) or key not in mapping:
        name = f"{where}{key}"
        raise ScanFormatError(file, name, "required field is missing",
                              fix or f"add '{name}' (see docs/formats.md for the schema)")
    return mapping[key]


def as_float_array(value, file, field: str, shape=None, positive: bool = False) -> np.ndarray:
    """A finite float64 array from a field, optionally of a given shape / strictly positive."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ScanFormatError(file, field, f"is not numeric ({value!r:.80})",
                              "give numbers") from None
    if shape is not None:
        want = tuple(shape)
        if arr.shape != want and not (arr.size == int(np.prod(want)) and arr.ndim <= 1):
            raise ScanFormatError(file, field, f"has shape {arr.shape}, expected {want}",
                                  f"give {int(np.prod(want))} value(s)")
        arr = arr.reshape(want)
    if not np.all(np.isfinite(arr)):
        raise ScanFormatError(file, field, "contains NaN or infinity", "give finite numbers")
    if positive and np.any(arr <= 0):
        raise ScanFormatError(file, field, f"must be positive, got {arr.ravel()[:6].tolist()}",
                              "give positive sizes/distances in mm")
    return arr


def check_projections(proj, file, field: str = "projections") -> np.ndarray:
    """Validate line-integral projections (V, rows, cols); return them as float32."""
    arr = np.asarray(proj)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)):
        raise ScanFormatError(file, field, f"has non-numeric type {arr.dtype}", "store float projections")
    if arr.ndim == 2:
        raise ScanFormatError(file, field, f"is a single 2D image {arr.shape}",
                              "give a stack (views, rows, cols) with one image per view")
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ScanFormatError(file, field, f"has shape {arr.shape}, expected (views, rows, cols)",
                              "give a 3D stack of projections")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    if bad.all():
        raise ScanFormatError(file, field, "holds no finite value (every pixel NaN or infinity)",
                              "check that the right file/array was given")
    if bad.any():  # infinities too: every one a missing value; a view with too many is ScanData.bad_views
        arr = np.where(bad, np.float32(np.nan), arr)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if hi == 0.0 and lo == 0.0:
        raise ScanFormatError(file, field, "all projections are zero",
                              "check that the right file/array was given")
    if lo < -NEGATIVE_TOLERANCE:
        raise ScanFormatError(
            file, field, f"has values down to {lo:.3g}; line integrals -log(I/I0) cannot be that "
            f"negative (noise tolerance {-NEGATIVE_TOLERANCE})",
            "if these are intensities give i0 or flat/dark fields; if the log was taken with the "
            "wrong sign, negate the data")
    if hi > INTENSITY_SUSPECT and lo >= 0:
        raise ScanFormatError(
            file, field, f"has values up to {hi:.4g}: these look like raw intensities, not line integrals",
            "declare them as intensities with an I0 or flat/dark fields (kind: intensity)")
    return arr


def _field_image(value, shape, file, field: str):
    """A scalar, a (rows, cols) image or a stack of them (averaged) matching the detector. An image's pixels
    without a value (NaN, infinity: dead in the flat or dark frame) stay NaN, dead pixels of every view, up
    to `MAX_DEFECT_FRACTION` of the detector."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr.mean(axis=0)
    if arr.ndim not in (0, 2) or (arr.ndim == 2 and arr.shape != tuple(shape)):
        raise ScanFormatError(file, field, f"has shape {arr.shape}, the projections are {tuple(shape)}",
                              "give one number or an image of the detector's size")
    bad = ~np.isfinite(arr)
    if bad.mean() > (MAX_DEFECT_FRACTION if arr.ndim == 2 else 0.0):
        raise ScanFormatError(file, field, "contains NaN or infinity" + (f" in {bad.mean():.1%} of its pixels, more "
                              "than a panel's dead pixels" if arr.ndim == 2 else ""), "repair the image")
    return np.where(bad, np.nan, arr)


def intensities_to_line_integrals(raw, file, field: str, i0=None, flat=None, dark=None) -> np.ndarray:
    """-log((I - dark) / (flat - dark)) or -log((I - dark) / (I0 - dark)), transmission kept in [1e-6, 1].

    The floor bounds line integrals at 13.8 where a pixel saw no photons; the ceiling turns
    noise above the open beam (more photons than the flat field) into zero attenuation. A pixel
    without a value, or dead in the flat field (not above the dark level), gives NaN: a missing
    measurement, which `ScanData` accepts up to `MAX_DEFECT_FRACTION` of a view. A view where most
    pixels saw no photons (`NO_BEAM_SHARE`: a frame taken while the beam was off, a dropped frame
    stored as the dark level) is NaN throughout: a bad view to leave out, not an object 13.8 thick.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 3:
        raise ScanFormatError(file, field, f"has shape {raw.shape}, expected (views, rows, cols)",
                              "give a 3D stack of intensity images")
    if not np.any(np.isfinite(raw)):
        raise ScanFormatError(file, field, "holds no finite value (NaN or infinity throughout)",
                              "repair the broken images")
    raw = np.where(np.isfinite(raw), raw, np.nan)  # an infinite count is no measurement either
    if np.nanmax(raw) <= 0:
        raise ScanFormatError(file, field, "all intensities are zero or negative",
                              "check that the right file was given")
    shape = raw.shape[1:]
    darkv = 0.0 if dark is None else _field_image(dark, shape, file, "dark")
    if np.any(raw < 0) and dark is None:
        raise ScanFormatError(file, field, "has negative intensities",
                              "give a dark field, or offset-corrected intensities")
    if flat is not None:
        open_beam = _field_image(flat, shape, file, "flat") - darkv
        where = "flat"
    elif i0 is not None:
        open_beam = float(i0) - darkv
        where = "i0"
    else:
        raise ScanFormatError(file, "i0", "intensities need an I0 or a flat field",
                              "add 'i0' (open-beam counts) or 'flat' (and optionally 'dark')")
    dead = ~(np.asarray(open_beam) > 0)  # NaN too: a pixel dead in the flat or dark frame
    if dead.mean() > MAX_DEFECT_FRACTION:
        raise ScanFormatError(file, where, "the open beam is not brighter than the dark level"
                              + ("" if dead.ndim == 0 else f" in {dead.mean():.1%} of the detector's pixels"),
                              "give a flat field / I0 above the dark field")
    with np.errstate(invalid="ignore", divide="ignore"):
        counts = raw - darkv
        trans = np.clip(counts / np.where(dead, np.nan, open_beam), 1e-6, 1.0)  # NaN stays NaN
        no_beam = (counts <= 0).reshape(len(raw), -1).mean(axis=1) > NO_BEAM_SHARE
        trans[no_beam] = np.nan
        return (-np.log(trans)).astype(np.float32)


def check_circular_distances(sid, sdd, file, field_sid: str = "sid", field_sdd: str = "sdd"):
    """Source-isocentre distance must be positive and smaller than source-detector distance."""
    sid = np.atleast_1d(np.asarray(sid, dtype=np.float64))
    sdd = np.atleast_1d(np.asarray(sdd, dtype=np.float64))
    if not (np.all(np.isfinite(sid)) and np.all(np.isfinite(sdd))):
        raise ScanFormatError(file, field_sid, "distances contain NaN/inf", "give finite distances in mm")
    if np.any(sid <= 0):
        raise ScanFormatError(file, field_sid, f"source-isocentre distance {sid.min():g} is not positive",
                              "give the distance from the source to the rotation axis in mm")
    if np.any(sid >= sdd):
        raise ScanFormatError(
            file, field_sdd, f"source-detector distance {sdd.min():g} is not larger than the "
            f"source-isocentre distance {sid.max():g}",
            "the detector must lie beyond the isocentre: check that the two distances are not swapped")


def check_geometry(geometry: ConeBeamGeometry, file, grid: VolumeGrid | None = None,
                   field: str = "geometry") -> None:
    """Finite vectors, a real detector plane, sources outside the reconstruction box."""
    for name in ("sources", "det_centers", "det_u", "det_v"):
        arr = getattr(geometry, name)
        if not np.all(np.isfinite(arr)):
            raise ScanFormatError(file, f"{field}.{name}", "contains NaN/inf", "give finite vectors")
    nu = np.linalg.norm(geometry.det_u, axis=1)
    nv = np.linalg.norm(geometry.det_v, axis=1)
    if np.any(np.abs(nu - 1) > 1e-3) or np.any(np.abs(nv - 1) > 1e-3):
        raise ScanFormatError(file, f"{field}.det_u/det_v", "detector axes are not unit vectors",
                              "give unit vectors (the pitch carries the pixel size)")
    cosang = np.abs(np.einsum("vi,vi->v", geometry.det_u, geometry.det_v))
    if np.any(cosang > 1e-3):
        raise ScanFormatError(file, f"{field}.det_u/det_v", "detector axes are not perpendicular",
                              "give perpendicular row and column directions")
    if not geometry.parallel:
        sdd = geometry.source_detector_distance()
        if np.any(sdd <= 1e-6):
            v = int(np.argmin(sdd))
            raise ScanFormatError(file, field, f"view {v}: the source lies in the detector plane",
                                  "check the source and detector positions")
    v = None if grid is None else first_source_inside(geometry, grid)
    if v is not None:
        lo, hi = grid.bounds()
        raise ScanFormatError(
            file, field, f"view {v}: the source {geometry.sources[v].round(2).tolist()} lies inside "
            f"the volume box {lo.round(1).tolist()}..{hi.round(1).tolist()}",
            "check the distance units (mm) and the volume size; the source must be outside the object")


def check_exists(path, field: str, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise ScanFormatError(path, field, f"{what} not found", "check the path (relative paths are "
                              "taken from the folder of the file that names them)")
    if path.is_file() and path.stat().st_size == 0:
        raise ScanFormatError(path, field, "file is empty (truncated download or failed write?)",
                              "write or download the file again")
    return path


def first_source_inside(geometry: ConeBeamGeometry, grid: VolumeGrid) -> int | None:
    """The first view whose source lies inside the grid's box (None when none does, or for a parallel beam)."""
    if geometry.parallel:
        return None
    lo, hi = grid.bounds()
    inside = np.flatnonzero(np.all((geometry.sources > lo) & (geometry.sources < hi), axis=1))
    return int(inside[0]) if inside.size else None


def grid_problem(geometry: ConeBeamGeometry, grid: VolumeGrid) -> str | None:
    """What makes `grid` unusable as the output grid of a scan, in words, or None.

    Two things: a source inside the grid's box (the distances or units cannot be right: rays
    would start inside the object), and a box that no view sees at all (a grid in another frame or
    units, e.g. a reference CT in patient coordinates: the volume would be empty, not merely poor).
    """
    lo, hi = grid.bounds()
    v = first_source_inside(geometry, grid)
    if v is not None:
        return (f"the source of view {v} at {geometry.sources[v].round(1).tolist()} mm lies inside the output "
                f"grid's box {lo.round(1).tolist()}..{hi.round(1).tolist()} mm")
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    normal = np.cross(geometry.det_u, geometry.det_v)                       # (V, 3)
    half_u = geometry.det_shape[1] * geometry.pixel_pitch[1] / 2.0
    half_v = geometry.det_shape[0] * geometry.pixel_pitch[0] / 2.0
    for k in range(geometry.n_views):
        c, s, n = geometry.det_centers[k], geometry.sources[k], normal[k]
        if geometry.parallel:
            hit = corners - ((corners - c) @ n)[:, None] * n
        else:
            depth = (corners - s) @ n
            ahead = depth * ((c - s) @ n) > 0  # corners on the detector's side of the source
            if not ahead.any():  # the whole box lies behind the source: this view does not see it
                continue
            if not ahead.all():  # the box straddles the source's plane: take it as seen
                return None
            hit = s + ((c - s) @ n / depth)[:, None] * (corners - s)
        u, v = (hit - c) @ geometry.det_u[k], (hit - c) @ geometry.det_v[k]
        if u.min() < half_u and u.max() > -half_u and v.min() < half_v and v.max() > -half_v:
            return None
    return (f"no view sees any part of the output grid's box {lo.round(1).tolist()}..{hi.round(1).tolist()} mm: "
            "its projection misses the detector in every view")


def load_npy(path, field: str, fix: str) -> np.ndarray:
    """A .npy array of plain numbers, checked from its header before anything is allocated.

    Refused as a ScanFormatError: object arrays and pickles inside .npy (never unpickled), record or
    string dtypes, a header that announces more data than the file holds (truncated) or than this
    machine's memory can take, and anything numpy cannot parse.
    """
    import psutil

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=100000)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=100000)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = fh.tell()
        size = path.stat().st_size
    except OSError as exc:
        raise ScanFormatError(path, field, f"cannot be read ({exc.strerror or exc})", fix) from None
    except (ValueError, SyntaxError, TypeError, EOFError, RecursionError, MemoryError, OverflowError,
            tokenize.TokenError) as exc:  # numpy parses the header with ast.literal_eval
        raise ScanFormatError(path, field, f"is not a valid .npy file ({' '.join(str(exc).split())[:160]})",
                              fix) from None
    if dtype.hasobject:
        raise ScanFormatError(path, field, "holds Python objects (a pickle inside the .npy); refused without "
                              "unpickling anything", "save a plain numeric array (np.save of a float array)")
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise ScanFormatError(path, field, f"holds {dtype} values, not plain numbers", fix)
    count = 1
    for s in shape:
        count *= int(s)
    nbytes = count * dtype.itemsize
    if nbytes > size - offset:
        raise ScanFormatError(path, field, f"its header announces a {list(shape)} {dtype} array ({nbytes} bytes) "
                              f"but the file holds {max(0, size - offset)} bytes of data: it is truncated", fix)
    avail = psutil.virtual_memory().available
    if nbytes * 3 > avail:
        raise ScanFormatError(path, field, f"its {list(shape)} {dtype} array ({nbytes / 2**30:.3g} GiB) needs more "
                              f"memory than is available ({avail / 2**30:.1f} GiB)", fix)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError) as exc:
        raise ScanFormatError(path, field, f"cannot be read as .npy ({' '.join(str(exc).split())[:160]})", fix) from None
    if not isinstance(arr, np.ndarray):
        raise ScanFormatError(path, field, "is not a single array", fix)
    return arr
