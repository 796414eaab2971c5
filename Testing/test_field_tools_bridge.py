"""field_tools on slicer-core's real vtkMRMLScene: surface models, export boxes and the projection
check land where the scanner frame says, in RAS = diag(-1, -1, 1) world."""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core package (a real vtkMRMLScene) is not installed")

from CTNeRFReconLib.data import Volume  # noqa: E402
from CTNeRFReconLib.geometry import VolumeGrid  # noqa: E402
from CTNeRFReconLib.phantom import Ellipsoid, voxelize  # noqa: E402
from CTNeRFReconLib.slicer_bridge import field_tools as ft  # noqa: E402
from CTNeRFReconLib.surface import extract_surface, write_surface  # noqa: E402

CENTRE = np.array([20.0, -12.0, 7.0])


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def surface_file(tmp_path_factory):
    grid = VolumeGrid.centered((40, 40, 40), (2.0,) * 3)
    vol = Volume(voxelize([Ellipsoid(tuple(CENTRE), (10.0, 8.0, 6.0), 0.02)], grid, supersample=2), grid)
    path = tmp_path_factory.mktemp("surf") / "blob.stl"
    write_surface(extract_surface(vol, 0.01), path)
    return path


def _points(poly):
    from vtkmodules.util.numpy_support import vtk_to_numpy

    return vtk_to_numpy(poly.GetPoints().GetData())


def test_model_node_in_ras(scene, surface_file):
    node = ft.model_node_from_file(scene, surface_file)
    assert node.IsA("vtkMRMLModelNode") and node.GetDisplayNode() is not None
    pts = _points(node.GetPolyData())
    assert np.allclose(pts.mean(axis=0), CENTRE * [-1, -1, 1], atol=0.3)  # RAS = (-x, -y, z)
    back = _points(ft.polydata_from_model_node(node))
    assert np.allclose(back.mean(axis=0), CENTRE, atol=0.3)
    same = ft.model_node_from_file(scene, surface_file, node=node)  # refilled in place
    assert same is node and scene.GetNumberOfNodesByClass("vtkMRMLModelNode") == 1


def test_roi_box_round_trip(scene):
    node = ft.roi_node_from_box(scene, CENTRE, (30.0, 20.0, 10.0))
    assert node.IsA("vtkMRMLMarkupsROINode")
    c = [0.0] * 3
    node.GetCenter(c)
    assert np.allclose(c, CENTRE * [-1, -1, 1])
    centre, size = ft.box_from_roi_node(node)
    assert np.allclose(centre, CENTRE) and np.allclose(size, (30.0, 20.0, 10.0))
    with pytest.raises(ValueError):
        ft.roi_node_from_box(scene, CENTRE, (0.0, 1.0, 1.0))


def test_projection_check_nodes(scene, tmp_path):
    from PIL import Image

    img = np.zeros((30, 50, 3), dtype=np.uint8)
    img[0, :, 0] = 255  # a red top row
    Image.fromarray(img).save(tmp_path / "projection_check.png")
    node = ft.projection_check_node(scene, tmp_path / "projection_check.png")
    assert node.IsA("vtkMRMLVectorVolumeNode")
    assert node.GetImageData().GetDimensions() == (50, 30, 1)
    from vtkmodules.util.numpy_support import vtk_to_numpy

    arr = vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(30, 50, 3)
    assert arr[0, 0, 0] == 255 and arr[1, 0, 0] == 0
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    m = vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    top = [m.GetElement(r, 3) for r in range(3)]  # voxel (0, 0, 0): the picture's top-left pixel
    bottom = [m.GetElement(r, 1) * 29 + m.GetElement(r, 3) for r in range(3)]  # row 29
    assert top[1] > bottom[1]  # row 0 lies towards +A: the top of an axial view
    assert top[0] < 0 < -top[0] + 1e-9  # centred left-right
    table = ft.residual_table_node(scene, {"rmse": [0.1, 0.5, 0.1], "angles_deg": [0, 120, 240], "held_out": [2]})
    assert table.GetTable().GetNumberOfRows() == 3 and table.GetTable().GetValueByName(1, "rmse").ToDouble() == 0.5
