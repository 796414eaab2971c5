"""TIGRE geometry and NAF-style pickles.

TIGRE's frame, read from its CUDA projector (``computeDeltas_Siddon``) and its Python wrapper
(``convert_to_c_geometry``):

* rotation axis z; at angle alpha the source is at ``Rz(alpha) (DSO, 0, 0)`` and the detector
  centre at ``Rz(alpha) (-(DSD - DSO), offDetecU, offDetecV)``; angles may be (N, 3) ZYZ Euler
  angles (alpha, theta, psi) as in TIGRE's arbitrary-axis mode;
* a pixel's column index u runs along ``Rz(alpha) (0, 1, 0)``; the Python output ``Ax(...)`` has
  shape (angles, nDetecV, nDetecU) and its row index runs along **+z** (row 0 is the bottom row:
  the kernel writes detector row ``nDetecV - 1 - v``);
* the Python geometry lists voxel fields as [z, y, x] (nVoxel, dVoxel, sVoxel, offOrigin) and
  detector fields as [v, u] (nDetector, dDetector, sDetector, offDetector); the volume array is
  img[z, y, x] and voxel i is centred at ``offOrigin_x - sVoxel_x / 2 + (i + 0.5) dVoxel_x``;
* rotDetector = [yaw, pitch, roll] (Python order) tilts the detector about its centre; COR shifts
  source and detector along the rotated y axis.

NAF and R2-Gaussian store TIGRE data transposed (see ``naf_to_scan``): their config lists voxel
fields as [x, y, z], offDetector as [u, v], the volume as image[x, y, z], and the projections as
``tigre.Ax(...)[:, ::-1, :]`` (row 0 at the top, row index along -z). NAF's generator divides all
lengths by 1000 before calling TIGRE, so its projections are line integrals over metres while its
config is in mm.
"""
from __future__ import annotations

import numpy as np

from ..data import ScanData, Volume
from ..geometry import ConeBeamGeometry, VolumeGrid
from .validate import (ScanFormatError, as_float_array, check_circular_distances, check_geometry,
                       check_projections, require)


def _per_view(value, n, file, field, k=None):
    arr = as_float_array(value, file, field)
    if k is None:
        if arr.ndim == 0 or arr.size == 1:
            return np.full(n, float(arr.reshape(-1)[0]))
        if arr.shape != (n,):
            raise ScanFormatError(file, field, f"has {arr.size} values for {n} views",
                                  "give one value or one per view")
        return arr
    if arr.ndim == 1 and arr.size == k:
        return np.broadcast_to(arr, (n, k)).copy()
    if arr.shape != (n, k):
        raise ScanFormatError(file, field, f"has shape {arr.shape}, expected ({k},) or ({n}, {k})",
                              f"give {k} values or {k} per view")
    return arr


def _rz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _euler_zyz(alpha, theta, psi):
    """TIGRE's eulerZYZ: Rz(alpha) Ry(theta) Rz(psi)."""
    ct, st = np.cos(theta), np.sin(theta)
    ry = np.array([[ct, 0.0, st], [0.0, 1.0, 0.0], [-st, 0.0, ct]])
    return _rz(alpha) @ ry @ _rz(psi)


def _roll_pitch_yaw(roll, pitch, yaw):
    """TIGRE's rollPitchYaw: Rz(roll) Ry(pitch) Rx(yaw)."""
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    ry = np.array([[cp, 0.0, sp], [0.0, 1.0, 0.0], [-sp, 0.0, cp]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cy, -sy], [0.0, sy, cy]])
    return _rz(roll) @ ry @ rx


def tigre_geometry(DSD, DSO, nDetector, dDetector, angles, offDetector=(0.0, 0.0), rotDetector=None,
                   COR=0.0, mode: str = "cone", file="<tigre geometry>", row_up: bool = True) -> ConeBeamGeometry:
    """Per-view geometry of a TIGRE scan (TIGRE Python field order: detector fields [v, u]).

    ``row_up=True`` describes TIGRE's own projection arrays (row index along +z); ``False`` the
    row-flipped arrays NAF and R2-Gaussian store.
    """
    ang = np.asarray(angles, dtype=np.float64)
    if ang.ndim == 1:
        ang = np.stack([ang, np.zeros_like(ang), np.zeros_like(ang)], axis=1)
    if ang.ndim != 2 or ang.shape[1] != 3 or ang.shape[0] < 1:
        raise ScanFormatError(file, "angles", f"has shape {ang.shape}, expected (N,) or (N, 3)",
                              "give one angle (radians) per view, or ZYZ triplets")
    if not np.all(np.isfinite(ang)):
        raise ScanFormatError(file, "angles", "contains NaN/inf", "give finite angles in radians")
    n = ang.shape[0]
    dsd = _per_view(DSD, n, file, "DSD")
    dso = _per_view(DSO, n, file, "DSO")
    if mode == "cone":
        check_circular_distances(dso, dsd, file, "DSO", "DSD")
    elif mode != "parallel":
        raise ScanFormatError(file, "mode", f"unknown mode {mode!r}", "use 'cone' or 'parallel'")
    ndet = as_float_array(nDetector, file, "nDetector", shape=(2,), positive=True)
    ddet = as_float_array(dDetector, file, "dDetector", shape=(2,), positive=True)
    offd = _per_view(np.asarray(offDetector, dtype=np.float64).reshape(-1)[:2]
                     if np.asarray(offDetector).ndim <= 1 else offDetector, n, file, "offDetector", 2)
    rot = np.zeros((n, 3)) if rotDetector is None else _per_view(rotDetector, n, file, "rotDetector", 3)
    cor = _per_view(COR, n, file, "COR")
    src, ctr, uu, vv = (np.zeros((n, 3)) for _ in range(4))
    for k in range(n):
        r = _euler_zyz(*ang[k])
        tilt = _roll_pitch_yaw(rot[k, 2], rot[k, 1], rot[k, 0])
        shift = np.array([-cor[k] * np.sin(ang[k, 0]), cor[k] * np.cos(ang[k, 0]), 0.0])
        src[k] = r @ np.array([dso[k], 0.0, 0.0]) + shift
        ctr[k] = r @ np.array([-(dsd[k] - dso[k]), offd[k, 1], offd[k, 0]]) + shift
        uu[k] = r @ tilt @ np.array([0.0, 1.0, 0.0])
        vv[k] = r @ tilt @ np.array([0.0, 0.0, 1.0 if row_up else -1.0])
    if mode == "parallel":
        # TIGRE's parallel projector: rays along -x (rotated) through each pixel; put a far
        # virtual source behind the centre so the per-view direction is right.
        src = ctr + (src - ctr) / np.linalg.norm(src - ctr, axis=1, keepdims=True) * 1e3 * max(1.0, dso.max())
    return ConeBeamGeometry(src, ctr, uu, vv, (int(ndet[0]), int(ndet[1])), (ddet[0], ddet[1]),
                            angles=ang[:, 0], parallel=(mode == "parallel"), frame="tigre")


def tigre_grid(nVoxel_zyx, dVoxel_zyx, offOrigin_zyx=(0.0, 0.0, 0.0), file="<tigre geometry>",
               field_prefix="") -> VolumeGrid:
    """TIGRE's image grid from Python-order [z, y, x] fields."""
    n = as_float_array(nVoxel_zyx, file, field_prefix + "nVoxel", shape=(3,), positive=True)
    d = as_float_array(dVoxel_zyx, file, field_prefix + "dVoxel", shape=(3,), positive=True)
    o = as_float_array(offOrigin_zyx, file, field_prefix + "offOrigin", shape=(3,))
    if np.any(n != np.round(n)):
        raise ScanFormatError(file, field_prefix + "nVoxel", f"{n.tolist()} are not whole numbers",
                              "give voxel counts as integers")
    shape_xyz = tuple(int(v) for v in n[::-1])
    return VolumeGrid.centered(shape_xyz, tuple(d[::-1]), tuple(o[::-1]))


NAF_REQUIRED = ("DSD", "DSO", "nDetector", "dDetector", "nVoxel", "dVoxel", "train")


def _naf_split(data, key, file, row_up, geo_kw):
    split = require(data, key, file)
    if not isinstance(split, dict):
        raise ScanFormatError(file, key, f"is a {type(split).__name__}, expected a dict",
                              "store {'projections': array, 'angles': array}")
    proj = check_projections(require(split, "projections", file, where=f"{key}."), file, f"{key}.projections")
    angles = require(split, "angles", file, where=f"{key}.")
    ang = np.asarray(angles, dtype=np.float64)
    if ang.shape[0] != proj.shape[0]:
        raise ScanFormatError(file, f"{key}.angles", f"has {ang.shape[0]} angles for {proj.shape[0]} projections",
                              "give one angle per projection")
    geom = tigre_geometry(angles=ang, file=file, row_up=row_up, **geo_kw)
    if tuple(proj.shape[1:]) != geom.det_shape:
        raise ScanFormatError(file, "nDetector", f"says {list(geom.det_shape)} (rows, cols) but the "
                              f"{key} projections are {list(proj.shape[1:])}",
                              "nDetector is [v, u] = [rows, cols]; fix the config or the array")
    return proj, geom


def naf_to_scan(data: dict, file) -> ScanData:
    """A NAF pickle (its config fields + 'train'/'val' + optional 'image') as ScanData, in mm.

    Field order in NAF's config: nVoxel/dVoxel/offOrigin [x, y, z], nDetector/dDetector [v, u],
    offDetector [u, v]; projections row 0 at the top; image[x, y, z]. Lengths are mm; the
    projections were computed in metres, so the reference image is divided by 1000 to give 1/mm.
    """
    for key in NAF_REQUIRED:
        require(data, key, file)
    off_uv = as_float_array(data.get("offDetector", [0.0, 0.0]), file, "offDetector").reshape(-1)
    if off_uv.size < 2:
        raise ScanFormatError(file, "offDetector", "needs two values [u, v]", "give [offset_u, offset_v] in mm")
    geo_kw = dict(DSD=data["DSD"], DSO=data["DSO"], nDetector=data["nDetector"], dDetector=data["dDetector"],
                  offDetector=[off_uv[1], off_uv[0]], mode=str(data.get("mode", "cone")))
    proj, geom = _naf_split(data, "train", file, False, geo_kw)
    n_xyz = as_float_array(data["nVoxel"], file, "nVoxel", shape=(3,), positive=True)
    d_xyz = as_float_array(data["dVoxel"], file, "dVoxel", shape=(3,), positive=True)
    o_xyz = as_float_array(data.get("offOrigin", [0.0, 0.0, 0.0]), file, "offOrigin", shape=(3,))
    grid = tigre_grid(n_xyz[::-1], d_xyz[::-1], o_xyz[::-1], file)
    check_geometry(geom, file, grid)
    notes = ["NAF/TIGRE pickle: rotation axis z, source at (DSO, 0, 0) at angle 0; projections stored "
             "row-flipped (row 0 at the top), nVoxel/dVoxel/offOrigin read as [x, y, z], offDetector as [u, v]"]
    reference = None
    if data.get("image") is not None:
        img = np.asarray(data["image"], dtype=np.float32)
        if img.shape != grid.shape_xyz:
            raise ScanFormatError(file, "image", f"has shape {img.shape}, nVoxel says {list(grid.shape_xyz)} [x, y, z]",
                                  "store image[x, y, z] of nVoxel's size")
        if not np.all(np.isfinite(img)):
            raise ScanFormatError(file, "image", "contains NaN/inf", "repair the reference volume")
        reference = Volume(np.ascontiguousarray(img.transpose(2, 1, 0)) / 1000.0, grid)
        notes.append("reference 'image' converted from 1/m to 1/mm (NAF projects with lengths in metres)")
    validation = None
    if isinstance(data.get("val"), dict) and data["val"].get("projections") is not None:
        vproj, vgeom = _naf_split(data, "val", file, False, geo_kw)
        validation = ScanData(vproj, vgeom, "naf", str(file), grid=grid)
    return ScanData(proj, geom, "naf", str(file), grid=grid, reference=reference,
                    validation=validation, notes=notes)


TIGRE_KEYS = ("DSD", "DSO", "nDetector", "dDetector", "nVoxel", "dVoxel", "sVoxel", "sDetector",
              "offOrigin", "offDetector", "rotDetector", "COR", "mode", "accuracy", "angles",
              "projections", "image", "filter", "geo", "unit", "name")


def tigre_dict_to_scan(data: dict, file) -> ScanData:
    """A pickle holding TIGRE Python fields as TIGRE itself uses them.

    Schema: geometry fields at top level or under 'geo' (TIGRE Python order: nVoxel/dVoxel/offOrigin
    [z, y, x], nDetector/dDetector/offDetector [v, u]), 'angles' (radians, (N,) or (N, 3)),
    'projections' exactly as ``tigre.Ax`` returns them (angles, v, u; row 0 at the bottom), optional
    'image' [z, y, x] in the same length unit as the geometry (taken as mm).
    """
    geo = dict(data.get("geo") or {})
    for k, v in data.items():
        if k != "geo":
            geo.setdefault(k, v)
    proj = check_projections(require(geo, "projections", file), file, "projections")
    for key in ("DSD", "DSO", "nDetector", "angles"):
        require(geo, key, file)
    ddet = geo.get("dDetector")
    if ddet is None:
        ddet = np.asarray(require(geo, "sDetector", file), dtype=np.float64) / np.asarray(geo["nDetector"], dtype=np.float64)
    ang = np.asarray(geo["angles"], dtype=np.float64)
    if ang.shape[0] != proj.shape[0]:
        raise ScanFormatError(file, "angles", f"has {ang.shape[0]} angles for {proj.shape[0]} projections",
                              "give one angle per projection")
    geom = tigre_geometry(geo["DSD"], geo["DSO"], geo["nDetector"], ddet, ang,
                          offDetector=geo.get("offDetector", (0.0, 0.0)), rotDetector=geo.get("rotDetector"),
                          COR=geo.get("COR", 0.0) if geo.get("COR") is not None else 0.0,
                          mode=str(geo.get("mode", "cone")), file=file, row_up=True)
    if tuple(proj.shape[1:]) != geom.det_shape:
        raise ScanFormatError(file, "nDetector", f"says {list(geom.det_shape)} [v, u] but projections are "
                              f"{list(proj.shape[1:])}", "nDetector is [rows, cols] in TIGRE's Python order")
    grid = None
    if geo.get("nVoxel") is not None:
        dvox = geo.get("dVoxel")
        if dvox is None:
            dvox = np.asarray(require(geo, "sVoxel", file), dtype=np.float64) / np.asarray(geo["nVoxel"], dtype=np.float64)
        grid = tigre_grid(geo["nVoxel"], dvox, geo.get("offOrigin", (0.0, 0.0, 0.0)), file)
    check_geometry(geom, file, grid)
    reference = None
    if geo.get("image") is not None and grid is not None:
        img = np.asarray(geo["image"], dtype=np.float32)
        if img.shape != grid.shape_zyx:
            raise ScanFormatError(file, "image", f"has shape {img.shape}, nVoxel says {list(grid.shape_zyx)} [z, y, x]",
                                  "store image[z, y, x] as TIGRE does")
        reference = Volume(img, grid)
    notes = ["TIGRE pickle (TIGRE Python field order): rotation axis z, projections as tigre.Ax returns "
             "them (row 0 at the bottom)"]
    return ScanData(proj, geom, "tigre", str(file), grid=grid, reference=reference, notes=notes)


def scan_to_naf_dict(proj_rowdown: np.ndarray, angles, DSD, DSO, nDetector_vu, dDetector_vu, nVoxel_xyz,
                     dVoxel_xyz, offOrigin_xyz=(0, 0, 0), offDetector_uv=(0, 0), image_xyz=None,
                     mode="cone", val=None) -> dict:
    """Build a dict in NAF's pickle layout (for tests and for exporting to NAF-family tools)."""
    d = dict(DSD=float(DSD), DSO=float(DSO), nDetector=list(nDetector_vu), dDetector=list(dDetector_vu),
             nVoxel=list(nVoxel_xyz), dVoxel=list(dVoxel_xyz), offOrigin=list(offOrigin_xyz),
             offDetector=list(offDetector_uv), accuracy=0.5, mode=mode, filter=None,
             totalAngle=360.0, startAngle=0.0, numTrain=int(len(angles)), numVal=0,
             train=dict(projections=np.asarray(proj_rowdown, dtype=np.float32),
                        angles=np.asarray(angles, dtype=np.float64)))
    if image_xyz is not None:
        d["image"] = np.asarray(image_xyz, dtype=np.float32)
    if val is not None:
        d["val"] = val
        d["numVal"] = int(len(val["angles"]))
    return d
