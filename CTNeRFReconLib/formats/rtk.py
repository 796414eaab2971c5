"""RTK cases: ThreeDCircularProjectionGeometry XML + a projection stack in RTK's [u, v, view] layout.

RTK's model (rtkThreeDCircularProjectionGeometry), for each view with gantry angle g, out-of-plane
angle o, in-plane angle i (degrees in the XML), source offsets (sx, sy), projection offsets
(px, py), source-isocentre distance SID and source-detector distance SDD:

* world -> rotated frame: ``R = Rz(-i) Rx(-o) Ry(-g)``; rotation axis y, so at g = 0 the source is
  at (0, 0, +SID) and at g = 90 at (+SID, 0, 0);
* in the rotated frame the source is at (sx, sy, SID) and the detector plane is z = SID - SDD,
  with detector coordinate (a, b) at (a + px, b + py, SID - SDD): u along x, v along y;
* the detector coordinate of stack pixel (col, row) comes from the stack image's own origin,
  spacing and direction (RTK issue 497: the origin is the first pixel's position, not the centre);
* SDD = 0 means a parallel beam along the rotated z axis.

Only ``xml.etree`` and SimpleITK are used here; the product never needs itk.
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..data import ScanData, Volume
from ..geometry import ConeBeamGeometry
from ..volume_io import atomic_write
from .validate import ScanFormatError, check_circular_distances, check_exists, check_geometry, check_projections

ROOT_TAG = "RTKThreeDCircularGeometry"
FIELDS = ("SourceToIsocenterDistance", "SourceToDetectorDistance", "GantryAngle", "OutOfPlaneAngle",
          "InPlaneAngle", "SourceOffsetX", "SourceOffsetY", "ProjectionOffsetX", "ProjectionOffsetY",
          "RadiusCylindricalDetector", "CollimationUInf", "CollimationUSup", "CollimationVInf",
          "CollimationVSup")
_DEFAULT_ZERO = ("OutOfPlaneAngle", "InPlaneAngle", "SourceOffsetX", "SourceOffsetY", "ProjectionOffsetX",
                 "ProjectionOffsetY", "RadiusCylindricalDetector")
MAX_XML_BYTES = 256 << 20
"""A geometry file larger than this is refused unread (RTK writes about 1 KiB per view)."""
IMAGE_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".nii", ".nii.gz", ".tif", ".tiff", ".hdr", ".vtk")


def _rx(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _ry(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rz(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rtk_rotation(gantry, out_of_plane, in_plane) -> np.ndarray:
    """World -> rotated-frame rotation of one view (angles in radians)."""
    return _rz(-in_plane) @ _rx(-out_of_plane) @ _ry(-gantry)


def is_rtk_xml(path) -> bool:
    try:
        for _, elem in ET.iterparse(str(path), events=("start",)):
            return elem.tag == ROOT_TAG
    except (ET.ParseError, OSError, UnicodeDecodeError):
        return False
    return False


def read_rtk_geometry_xml(path) -> dict:
    """Per-view RTK parameters as float arrays (angles in degrees, as in the file)."""
    path = check_exists(path, "geometry")
    size = path.stat().st_size
    if size > MAX_XML_BYTES:
        raise ScanFormatError(path, "xml", f"is {size / 2**20:.0f} MiB, far more than a geometry of any real scan "
                              f"(limit {MAX_XML_BYTES >> 20} MiB)", "give RTK's geometry file of the scan")
    text = path.read_bytes()
    if b"<!ENTITY" in text or b"<!entity" in text.lower():
        raise ScanFormatError(path, "xml", "declares XML entities (<!ENTITY ...>), which RTK geometry files never "
                              "use; refused unread (entity expansion and external entities are not allowed)",
                              "give the geometry file RTK wrote (rtksimulatedgeometry or its XML writer)")
    try:
        root = ET.fromstring(text)
    except (ET.ParseError, RecursionError, ValueError) as exc:
        raise ScanFormatError(path, "xml", f"is not well-formed XML ({' '.join(str(exc).split())[:160]})",
                              "the file is truncated or corrupt; write it again") from None
    if root.tag != ROOT_TAG:
        raise ScanFormatError(path, "root", f"root element is <{root.tag}>, expected <{ROOT_TAG}>",
                              "give an RTK ThreeDCircularProjectionGeometry file")
    def number(elem, where):
        try:
            return float(elem.text)
        except (TypeError, ValueError):
            raise ScanFormatError(path, where, f"value {elem.text!r:.60} is not a number", "give a number") from None
    glob = {}
    for child in root:
        if child.tag in FIELDS:
            glob[child.tag] = number(child, child.tag)
    views = root.findall("Projection")
    if not views:
        raise ScanFormatError(path, "Projection", "the geometry has no projections",
                              "add one <Projection> element per view")
    out = {k: np.zeros(len(views)) for k in FIELDS}
    for k, view in enumerate(views):
        local = {c.tag: number(c, f"Projection[{k}].{c.tag}") for c in view if c.tag in FIELDS}
        for name in FIELDS:
            if name in local:
                out[name][k] = local[name]
            elif name in glob:
                out[name][k] = glob[name]
            elif name in ("SourceToIsocenterDistance", "SourceToDetectorDistance", "GantryAngle"):
                raise ScanFormatError(path, f"Projection[{k}].{name}", "required field is missing",
                                      f"add <{name}> to the projection or once at the top level")
    if np.any(out["RadiusCylindricalDetector"] != 0):
        raise ScanFormatError(path, "RadiusCylindricalDetector", "cylindrical detectors are not supported",
                              "give projections resampled onto a flat detector")
    return out


def rtk_to_geometry(params: dict, det_size, det_origin, det_spacing, det_direction=None,
                    file="<rtk>") -> ConeBeamGeometry:
    """ConeBeamGeometry of an RTK geometry and its stack's in-plane origin/spacing/direction.

    ``det_size`` = (n_u, n_v); ``det_origin``/``det_spacing`` the first two components of the stack
    image's origin/spacing; ``det_direction`` its 3x3 direction (identity if None).
    """
    n_u, n_v = int(det_size[0]), int(det_size[1])
    d = np.eye(3) if det_direction is None else np.asarray(det_direction, dtype=np.float64).reshape(3, 3)
    if np.any(np.abs(d[:2, 2]) > 1e-9) or np.any(np.abs(d[2, :2]) > 1e-9):
        raise ScanFormatError(file, "projections.direction", "the stack's direction mixes the view axis with "
                              "the detector axes", "write the stack with a direction that keeps axis 3 = views")
    sid, sdd = params["SourceToIsocenterDistance"], params["SourceToDetectorDistance"]
    parallel = bool(np.all(sdd == 0))
    if np.any(sdd == 0) and not parallel:
        raise ScanFormatError(file, "SourceToDetectorDistance", "mixes parallel (0) and cone-beam views",
                              "use one beam type per scan")
    if not parallel:
        check_circular_distances(sid, sdd, file, "SourceToIsocenterDistance", "SourceToDetectorDistance")
    n = sid.shape[0]
    g = np.radians(params["GantryAngle"])
    o = np.radians(params["OutOfPlaneAngle"])
    i = np.radians(params["InPlaneAngle"])
    sp_u, sp_v = float(det_spacing[0]), float(det_spacing[1])
    # detector coordinates of the pixel array's centre, and the in-plane axes of columns and rows
    centre_ab = (np.asarray(det_origin[:2], dtype=np.float64)
                 + d[:2, :2] @ np.array([(n_u - 1) / 2.0 * sp_u, (n_v - 1) / 2.0 * sp_v]))
    src, ctr, uu, vv = (np.zeros((n, 3)) for _ in range(4))
    for k in range(n):
        rt = rtk_rotation(g[k], o[k], i[k]).T
        plane_z = 0.0 if parallel else sid[k] - sdd[k]
        c_rot = np.array([centre_ab[0] + params["ProjectionOffsetX"][k],
                          centre_ab[1] + params["ProjectionOffsetY"][k], plane_z])
        ctr[k] = rt @ c_rot
        uu[k] = rt @ np.array([d[0, 0], d[1, 0], 0.0])
        vv[k] = rt @ np.array([d[0, 1], d[1, 1], 0.0])
        if parallel:
            src[k] = ctr[k] + rt @ np.array([0.0, 0.0, 1e6])
        else:
            src[k] = rt @ np.array([params["SourceOffsetX"][k], params["SourceOffsetY"][k], sid[k]])
    return ConeBeamGeometry(src, ctr, uu, vv, (n_v, n_u), (sp_v, sp_u), angles=g, parallel=parallel, frame="rtk")


def find_stack(xml_path: Path, projections=None) -> Path:
    """The projection stack of an RTK case (see load_rtk)."""
    if projections is not None:
        return check_exists(projections, "projections", "projection stack")
    folder = xml_path.parent
    named = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().startswith("projections.")
                   and any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES))
    if len(named) >= 1:
        return named[0]
    images = sorted(p for p in folder.iterdir() if p.is_file()
                    and any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES))
    if len(images) == 1:
        return images[0]
    what = "no image file" if not images else f"{len(images)} image files ({', '.join(p.name for p in images[:5])})"
    raise ScanFormatError(folder, "projections", f"found {what} beside {xml_path.name} and none named projections.*",
                          "name the stack projections.mha, or give it explicitly (--projections / projections=)")


def read_stack(path: Path, field: str = "projections") -> sitk.Image:
    from ..volume_io import read_input_image

    fix = "copy or write the stack again; it must be an image file (MHA, NRRD, NIfTI, TIFF)"
    img = read_input_image(path, field, fix, what="projection stack")  # in a child process: a crash is a refusal
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ScanFormatError(path, field, f"is {img.GetDimension()}D with "
                              f"{img.GetNumberOfComponentsPerPixel()} components, expected a 3D scalar stack [u, v, view]",
                              "stack the projections along the third axis")
    return img


def load_rtk(xml_path, projections=None) -> ScanData:
    """Load an RTK geometry XML with its projection stack (line integrals).

    The stack is ``projections=`` when given, else the image named projections.* beside the XML,
    else the only image file in that folder; other files are ignored.
    """
    xml_path = Path(xml_path)
    params = read_rtk_geometry_xml(xml_path)
    stack_path = find_stack(xml_path, projections)
    img = read_stack(stack_path)
    n_u, n_v, n_views = img.GetSize()
    if n_views != params["GantryAngle"].shape[0]:
        raise ScanFormatError(stack_path, "projections", f"has {n_views} views but {xml_path.name} describes "
                              f"{params['GantryAngle'].shape[0]}", "give the stack and geometry of the same scan")
    proj = check_projections(sitk.GetArrayFromImage(img), stack_path)
    geom = rtk_to_geometry(params, (n_u, n_v), img.GetOrigin(), img.GetSpacing(), img.GetDirection(), xml_path)
    check_geometry(geom, xml_path)
    notes = ["RTK ThreeDCircularProjectionGeometry: rotation axis y, source at (0, 0, +SID) at gantry 0; "
             f"pixel positions from {stack_path.name}'s origin {np.round(img.GetOrigin()[:2], 3).tolist()} and "
             f"spacing {np.round(img.GetSpacing()[:2], 4).tolist()}"]
    reference = None
    ref = xml_path.parent / "reference.nrrd"
    if ref.exists() and ref != stack_path:
        from ..volume_io import read_input_volume
        reference = read_input_volume(ref, "reference", "repair reference.nrrd (the ground truth used only for "
                                      "scoring), or move it out of the case folder")
        notes.append("reference volume: reference.nrrd")
    return ScanData(proj, geom, "rtk", str(xml_path), reference=reference, notes=notes,
                    projections_file=str(stack_path))


def geometry_to_rtk(geometry: ConeBeamGeometry) -> tuple[dict, np.ndarray]:
    """RTK parameters (degrees) reproducing a cone-beam geometry with a centred, identity-direction stack.

    Returns the parameters and a per-view flag telling which views' rows must be flipped (when
    det_u x det_v points away from the source, RTK's v axis is the opposite of ours).
    """
    if geometry.parallel:
        raise ValueError("write_rtk_case: parallel-beam geometries are not written as RTK cases; "
                         "use a cone-beam geometry")
    n = geometry.n_views
    out = {k: np.zeros(n) for k in FIELDS}
    flip = np.zeros(n, dtype=bool)
    for k in range(n):
        u, v = geometry.det_u[k], geometry.det_v[k]
        nrm = np.cross(u, v)
        if np.dot(geometry.sources[k] - geometry.det_centers[k], nrm) < 0:
            v, nrm, flip[k] = -v, -nrm, True
        m = np.stack([u, v, nrm], axis=1)  # rotated frame -> world
        o = math.asin(float(np.clip(-m[1, 2], -1.0, 1.0)))
        i = math.atan2(m[1, 0], m[1, 1])
        g = math.atan2(m[0, 2], m[2, 2])
        r = rtk_rotation(g, o, i)
        s_rot = r @ geometry.sources[k]
        c_rot = r @ geometry.det_centers[k]
        out["GantryAngle"][k] = math.degrees(g) % 360.0
        out["OutOfPlaneAngle"][k] = math.degrees(o)
        out["InPlaneAngle"][k] = math.degrees(i)
        out["SourceOffsetX"][k], out["SourceOffsetY"][k] = s_rot[0], s_rot[1]
        out["SourceToIsocenterDistance"][k] = s_rot[2]
        out["SourceToDetectorDistance"][k] = s_rot[2] - c_rot[2]
        out["ProjectionOffsetX"][k], out["ProjectionOffsetY"][k] = c_rot[0], c_rot[1]
    return out, flip


def rtk_matrix(p: dict, k: int) -> np.ndarray:
    """RTK's 3x4 projection matrix of view k (world mm -> detector coordinates, homogeneous)."""
    sid, sdd = p["SourceToIsocenterDistance"][k], p["SourceToDetectorDistance"][k]
    sx, sy = p["SourceOffsetX"][k], p["SourceOffsetY"][k]
    px, py = p["ProjectionOffsetX"][k], p["ProjectionOffsetY"][k]
    r4 = np.eye(4)
    r4[:3, :3] = rtk_rotation(*np.radians([p["GantryAngle"][k], p["OutOfPlaneAngle"][k], p["InPlaneAngle"][k]]))
    t_src = np.eye(4)
    t_src[:3, 3] = [-sx, -sy, -sid]
    mag = np.array([[-sdd, 0, 0, 0], [0, -sdd, 0, 0], [0, 0, 1, 0]], dtype=np.float64)
    t_proj = np.array([[1, 0, sx - px], [0, 1, sy - py], [0, 0, 1]], dtype=np.float64)
    return t_proj @ mag @ t_src @ r4


def write_rtk_geometry_xml(params: dict, path) -> Path:
    """Write RTK's XML schema (version 3), every field per projection, with its matrix."""
    path = Path(path)
    n = params["GantryAngle"].shape[0]
    lines = ['<?xml version="1.0"?>', "<!DOCTYPE RTKGEOMETRY>", f'<{ROOT_TAG} version="3">']
    order = ("SourceToIsocenterDistance", "SourceToDetectorDistance", "GantryAngle", "SourceOffsetX",
             "SourceOffsetY", "ProjectionOffsetX", "ProjectionOffsetY", "InPlaneAngle", "OutOfPlaneAngle")
    for k in range(n):
        lines.append("  <Projection>")
        for name in order:
            lines.append(f"    <{name}>{float(params[name][k])!r}</{name}>")
        m = rtk_matrix(params, k)
        rows = "\n".join("      " + " ".join(f"{float(x)!r}" for x in row) for row in m)
        lines.append(f"    <Matrix>\n{rows}\n    </Matrix>")
        lines.append("  </Projection>")
    lines.append(f"</{ROOT_TAG}>")
    text = "\n".join(lines) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_rtk_case(scan: ScanData, folder, reference: Volume | None = None) -> Path:
    """Write scan as an RTK case: geometry.xml, projections.mha (+ reference.nrrd). Returns the XML path.

    The stack is centred on its detector (origin = -(n - 1) / 2 * pitch) with identity direction;
    the geometry's offsets carry where the detector really is.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params, flip = geometry_to_rtk(scan.geometry)
    proj = np.array(scan.projections, dtype=np.float32, copy=True)
    proj[flip] = proj[flip][:, ::-1, :]
    xml = write_rtk_geometry_xml(params, folder / "geometry.xml")
    n_v, n_u = scan.geometry.det_shape
    p_v, p_u = scan.geometry.pixel_pitch
    img = sitk.GetImageFromArray(proj)
    img.SetSpacing((p_u, p_v, 1.0))
    img.SetOrigin((-(n_u - 1) / 2.0 * p_u, -(n_v - 1) / 2.0 * p_v, 0.0))
    atomic_write(folder / "projections.mha", lambda tmp: sitk.WriteImage(img, str(tmp)))
    if reference is not None:
        from ..volume_io import write_volume
        write_volume(reference, folder / "reference.nrrd")
    return xml
