"""Surface models, export boxes and projection-check images as MRML nodes (MRML/VTK only, no Qt).

Frames. The engine writes surfaces (surface.py) and boxes (field_export.py) in the scanner frame in
mm, like its volumes; Slicer shows RAS. The same mapping as volume_nodes applies to points:
``RAS = diag(-1, -1, 1) . world`` (a rotation by 180 degrees about z, so triangles keep their
orientation), and an axis-aligned box stays axis-aligned with the same size, its centre mapped.

For the panel's buttons:

* **Make surface**: ``surface.run_surface(run_dir, out, threshold, spacing, centre, size)`` (or the
  CLI ``surface``) in the engine, then :func:`model_node_from_file` (or :func:`model_node_from_polydata`);
* **Export region**: :func:`box_from_roi_node` (an ROI the user placed, or :func:`roi_node_from_box`
  to show the run's box first) gives ``centre_xyz, size_xyz`` in the scanner frame for
  ``field_export.export_region`` (or the CLI ``export --roi``); the result loads as a volume;
* **Projection check**: ``projection_check.check_run(run_dir)`` (or the worker's end-of-run
  ``projection_check`` event, whose ``path`` it names), then :func:`projection_check_node`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .volume_nodes import RAS_FROM_WORLD

ATTR_SOURCE = "CTNeRFRecon.Source"
"""The file or run a node was made from."""
ATTR_FRAME = "CTNeRFRecon.Frame"


def _flip_polydata(poly):
    """A copy of the polydata with its points mapped scanner frame <-> RAS (its own inverse)."""
    from vtkmodules.vtkCommonDataModel import vtkPolyData
    from vtkmodules.vtkCommonTransforms import vtkTransform
    from vtkmodules.vtkFiltersGeneral import vtkTransformPolyDataFilter

    tr = vtkTransform()
    tr.SetMatrix([float(v) for v in RAS_FROM_WORLD.reshape(-1)])
    f = vtkTransformPolyDataFilter()
    f.SetTransform(tr)
    f.SetInputData(poly)
    f.Update()
    out = vtkPolyData()
    out.DeepCopy(f.GetOutput())
    return out


def model_node_from_polydata(scene, polydata, name: str = "CTNeRFRecon surface", color=(0.9, 0.8, 0.7),
                             node=None, source: str = ""):
    """A model node (with display node) holding a scanner-frame surface placed in RAS.

    Given `node` (a vtkMRMLModelNode), that node is refilled in place (pressed again, the button
    updates the same model)."""
    ras = _flip_polydata(polydata)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLModelNode", scene.GenerateUniqueName(name))
    node.SetAndObservePolyData(ras)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetColor(*color)
        display.SetVisibility(True)
    node.SetAttribute(ATTR_FRAME, "RAS from scanner frame diag(-1,-1,1)")
    if source:
        node.SetAttribute(ATTR_SOURCE, str(source))
    return node


def model_node_from_file(scene, path, name: str | None = None, node=None, **kwargs):
    """A model node from a surface file the engine wrote (.vtp, .stl, .obj: scanner frame, mm).

    Use this rather than Slicer's generic loader: it does not know the file is in the scanner frame."""
    from ..surface import read_surface

    path = Path(path)
    poly = read_surface(path)
    return model_node_from_polydata(scene, poly, name or path.stem, node=node, source=str(path.absolute()), **kwargs)


def polydata_from_model_node(node):
    """The model's surface back in the scanner frame (a copy)."""
    poly = node.GetPolyData()
    if poly is None:
        raise ValueError(f"model node '{node.GetName()}' has no surface")
    return _flip_polydata(poly)


# -- export boxes -------------------------------------------------------------------------------------
def roi_node_from_box(scene, centre_xyz, size_xyz, name: str = "CTNeRFRecon export box", node=None):
    """An ROI markups node (vtkMRMLMarkupsROINode) showing a scanner-frame box in RAS."""
    centre = np.asarray(centre_xyz, dtype=float).reshape(3)
    size = np.asarray(size_xyz, dtype=float).reshape(3)
    if np.any(size <= 0) or not np.all(np.isfinite(size)) or not np.all(np.isfinite(centre)):
        raise ValueError(f"a box needs a finite centre and a positive size in mm, got {centre.tolist()}, "
                         f"{size.tolist()}")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", scene.GenerateUniqueName(name))
    ras = RAS_FROM_WORLD[:3, :3] @ centre
    node.SetCenter(*[float(v) for v in ras])
    node.SetSize(*[float(v) for v in size])
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def box_from_roi_node(node) -> tuple[np.ndarray, np.ndarray]:
    """(centre_xyz, size_xyz) in the scanner frame, mm, of an ROI node: the axis-aligned box around
    it in RAS (a rotated or transformed ROI is enclosed), mapped to the scanner frame."""
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    lo = np.array(bounds[0::2], dtype=float)
    hi = np.array(bounds[1::2], dtype=float)
    if not np.all(np.isfinite(lo)) or not np.all(hi >= lo):
        raise ValueError(f"ROI node '{node.GetName()}' has no extent; place the box first")
    flip = RAS_FROM_WORLD.diagonal()[:3]
    centre = ((lo + hi) / 2.0) * flip
    return centre, hi - lo


# -- projection check -----------------------------------------------------------------------------------
def projection_check_node(scene, png_path, name: str = "CTNeRFRecon projection check", node=None):
    """The projection-check picture (projection_check.png) as an RGB vector volume node, one slice.

    Shown in a slice view (Red, axial) it reads as on disk: the image's top row at the top (+A in
    RAS is up in the axial view) and its first column on the left (+R is on the left of Slicer's
    axial view, the radiological convention), one pixel per mm, centred on the origin."""
    from PIL import Image
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonCore import VTK_UNSIGNED_CHAR
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    path = Path(png_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: projection check picture not found; run the check first")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    h, w, _ = rgb.shape
    image = vtkImageData()
    image.SetDimensions(w, h, 1)
    image.AllocateScalars(VTK_UNSIGNED_CHAR, 3)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = rgb.reshape(-1, 3)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", scene.GenerateUniqueName(name))
    m = vtkMatrix4x4()  # i (column 0 at the left) -> -R, j (row 0 at the top) -> -A, centred
    m.SetElement(0, 0, -1.0)
    m.SetElement(1, 1, -1.0)
    m.SetElement(0, 3, (w - 1) / 2.0)
    m.SetElement(1, 3, (h - 1) / 2.0)
    node.SetIJKToRASMatrix(m)
    node.SetAndObserveImageData(image)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.SetAttribute(ATTR_SOURCE, str(path.absolute()))
    return node


def residual_table_node(scene, result: dict, name: str = "CTNeRFRecon projection residuals", node=None):
    """A table node of the per-view residuals (view, angle_deg, rmse, held_out) from a projection
    check result or `projection_check` event, for a plot."""
    from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkIntArray

    rmse = list(result.get("rmse") or [])
    angles = list(result.get("angles_deg") or [float("nan")] * len(rmse))
    held = set(result.get("held_out") or [])
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table = node.GetTable()
    table.Initialize()
    cols = [("view", vtkIntArray()), ("angle_deg", vtkDoubleArray()), ("rmse", vtkDoubleArray()),
            ("held_out", vtkIntArray())]
    for label, arr in cols:
        arr.SetName(label)
        arr.SetNumberOfTuples(len(rmse))
    for i, r in enumerate(rmse):
        cols[0][1].SetValue(i, i)
        cols[1][1].SetValue(i, float(angles[i]) if angles[i] is not None else float("nan"))
        cols[2][1].SetValue(i, float(r) if r is not None else float("nan"))
        cols[3][1].SetValue(i, int(i in held))
    for _, arr in cols:
        table.AddColumn(arr)
    table.Modified()
    node.Modified()
    return node
