"""Independent reference projections for the format tests: RTK's Joseph projector (itk-rtk, CPU).

Tests import this only after ``pytest.importorskip("itk")``; the product never needs itk.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def rtk_geometry(views):
    """RTK geometry from dicts with sid, sdd, gantry and optional px, py, oop, ip, sx, sy (mm, degrees)."""
    from itk import RTK as rtk
    g = rtk.ThreeDCircularProjectionGeometry.New()
    for v in views:
        g.AddProjection(float(v["sid"]), float(v["sdd"]), float(v["gantry"]), float(v.get("px", 0.0)),
                        float(v.get("py", 0.0)), float(v.get("oop", 0.0)), float(v.get("ip", 0.0)),
                        float(v.get("sx", 0.0)), float(v.get("sy", 0.0)))
    return g


def joseph(volume_zyx: np.ndarray, origin_xyz, spacing_xyz, geometry, det_size_uv, det_origin_uv,
           det_spacing_uv) -> np.ndarray:
    """Joseph line integrals (views, rows, cols) of an axis-aligned volume (ITK array order)."""
    import itk
    from itk import RTK as rtk
    f3 = itk.Image[itk.F, 3]
    vol = itk.image_from_array(np.ascontiguousarray(volume_zyx, dtype=np.float32))
    vol.SetOrigin([float(v) for v in origin_xyz])
    vol.SetSpacing([float(v) for v in spacing_xyz])
    n_views = len(geometry.GetGantryAngles())
    src = rtk.ConstantImageSource[f3].New()
    src.SetOrigin([float(det_origin_uv[0]), float(det_origin_uv[1]), 0.0])
    src.SetSpacing([float(det_spacing_uv[0]), float(det_spacing_uv[1]), 1.0])
    src.SetSize([int(det_size_uv[0]), int(det_size_uv[1]), n_views])
    src.SetConstant(0.0)
    fp = rtk.JosephForwardProjectionImageFilter[f3, f3].New()
    fp.SetInput(0, src.GetOutput())
    fp.SetInput(1, vol)
    fp.SetGeometry(geometry)
    fp.Update()
    return itk.array_from_image(fp.GetOutput()).astype(np.float64)


def write_rtk_files(folder: Path, geometry, proj: np.ndarray, det_origin_uv, det_spacing_uv,
                    name: str = "projections.mha") -> Path:
    """Write a case with RTK's own XML writer and an ITK stack (independent of our writer)."""
    import itk
    from itk import RTK as rtk
    folder.mkdir(parents=True, exist_ok=True)
    w = rtk.ThreeDCircularProjectionGeometryXMLFileWriter.New()
    w.SetFilename(str(folder / "geometry.xml"))
    w.SetObject(geometry)
    w.WriteFile()
    img = itk.image_from_array(np.ascontiguousarray(proj, dtype=np.float32))
    img.SetOrigin([float(det_origin_uv[0]), float(det_origin_uv[1]), 0.0])
    img.SetSpacing([float(det_spacing_uv[0]), float(det_spacing_uv[1]), 1.0])
    itk.imwrite(img, str(folder / name))
    return folder / "geometry.xml"


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    """RMS of the difference relative to the RMS of the reference b."""
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


def tigre_joseph(img_zyx: np.ndarray, dvoxel_xyz, offorigin_xyz, dsd: float, dso: float, ndet_vu, ddet_vu,
                 offdet_vu, angles_rad) -> np.ndarray:
    """Projections exactly as TIGRE's Python ``Ax`` lays them out, computed by RTK's Joseph.

    Hand-derived equivalence: relabel TIGRE's world (x, y, z) as RTK's (X, Y, Z) = (y, z, x) (a
    rotation, so handedness is kept). TIGRE's source Rz(a) (DSO, 0, 0) becomes (DSO sin a, 0,
    DSO cos a) = RTK's source at gantry a; TIGRE's u (+y at a = 0) is RTK's +X = u; TIGRE's
    output rows run along +z = RTK's +Y = v; offDetector u / v are ProjectionOffsetX / Y.
    The volume img[z, y, x] becomes RTK's array [Z, Y, X] = [x, z, y].
    """
    nz, ny, nx = img_zyx.shape
    d = np.asarray(dvoxel_xyz, dtype=np.float64)
    first = np.asarray(offorigin_xyz, dtype=np.float64) - np.array([nx, ny, nz]) * d / 2 + d / 2
    vol = np.transpose(img_zyx, (2, 0, 1))
    views = [dict(sid=dso, sdd=dsd, gantry=float(np.degrees(a)), px=offdet_vu[1], py=offdet_vu[0])
             for a in np.asarray(angles_rad)]
    n_v, n_u = int(ndet_vu[0]), int(ndet_vu[1])
    d_v, d_u = float(ddet_vu[0]), float(ddet_vu[1])
    return joseph(vol, (first[1], first[2], first[0]), (d[1], d[2], d[0]), rtk_geometry(views), (n_u, n_v),
                  (-(n_u - 1) / 2 * d_u, -(n_v - 1) / 2 * d_v), (d_u, d_v))
