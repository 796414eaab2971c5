"""field_tools on slicer-core's real vtkMRMLScene: surface models, export boxes and the projection
check land where the scanner frame says, in RAS = diag(-1, -1, 1) world.

The last three tests draw the panel's results with Slicer's own views (Testing/slicer_render.py,
as test_slicer_views_rendered.py does) and check the pixels against where the scanner frame puts them:

* Make surface: the model of a .vtp the engine's ``surface`` wrote, seen by a parallel-projection
  camera from anterior and from superior, covers the pixel box that the surface's scanner-frame
  bounds, mapped to RAS, project to through the renderer's camera (vtkRenderer.WorldToDisplay);
  the same surface placed without the mapping (world taken as RAS) is drawn tens of pixels away;
* Export region: the volume ``export`` evaluated in a markups ROI's box, shown in the Red, Yellow
  and Green slice views, is non-zero exactly over the ROI's RAS extent there; exported from the
  ROI's RAS centre taken as a scanner-frame one, it is not;
* Projection check: the picture node in the Red view reads as the PNG on disk (not mirrored), its
  measured and rendered panels grey and its difference panel in colour, where the PNG has them.

Those skip, with the reason, where an offscreen OpenGL (EGL) driver is missing.
"""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core package (a real vtkMRMLScene) is not installed")

import slicer_render as sr  # noqa: E402
from CTNeRFReconLib.data import Volume  # noqa: E402
from CTNeRFReconLib.geometry import VolumeGrid  # noqa: E402
from CTNeRFReconLib.phantom import Ellipsoid, voxelize  # noqa: E402
from CTNeRFReconLib.slicer_bridge import field_tools as ft  # noqa: E402
from CTNeRFReconLib.slicer_bridge import views as slice_views  # noqa: E402
from CTNeRFReconLib.slicer_bridge import volume_nodes as vn  # noqa: E402
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
    right = [m.GetElement(r, 0) * 49 + m.GetElement(r, 3) for r in range(3)]  # column 49
    assert top[1] > bottom[1]  # row 0 lies towards +A: the top of an axial view
    assert top[0] > 0 > right[0] and right[0] == pytest.approx(-top[0])  # column 0 towards +R: the left of
    # an axial view (Slicer shows patient right on the left), centred left-right
    table = ft.residual_table_node(scene, {"rmse": [0.1, 0.5, 0.1], "angles_deg": [0, 120, 240], "held_out": [2]})
    assert table.GetTable().GetNumberOfRows() == 3 and table.GetTable().GetValueByName(1, "rmse").ToDouble() == 0.5


# -- rendered by Slicer's views ---------------------------------------------------------------------------
BODY = Ellipsoid((5.0, -3.0, 2.0), (30.0, 24.0, 20.0), 0.02)
INSERT = Ellipsoid(tuple(CENTRE), (10.0, 8.0, 6.0), 0.02)
"""The run's object: a body and, inside it off-centre, an insert (body + insert 0.04 /mm)."""
PIXEL_TOLERANCE = 2.0
"""How far (pixels) a measured box edge may lie from the predicted one (rounding to pixel centres)."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder holding only its volume.nrrd (as an FDK run): the engine's ``surface`` and
    ``export`` evaluate it by resampling that volume."""
    from CTNeRFReconLib.volume_io import write_volume

    grid = VolumeGrid.centered((40, 40, 40), (2.0,) * 3)
    run = tmp_path_factory.mktemp("run")
    write_volume(Volume(voxelize([BODY, INSERT], grid, supersample=2), grid), run / "volume.nrrd")
    return run


@pytest.fixture(scope="module")
def slicer_views():
    """Slicer's slice views and 3D view on a scene of their own (made before any data, as in Slicer)."""
    sr.require_offscreen()
    views = sr.SlicerViews(slicer.vtkMRMLScene())
    yield views
    views.close()


def _ras_box(world_bounds):
    """(lo, hi) in RAS of a scanner-frame box (xmin, xmax, ymin, ymax, zmin, zmax): RAS = (-x, -y, z)."""
    lo, hi = np.array(world_bounds[0::2], float), np.array(world_bounds[1::2], float)
    flip = np.array([-1.0, -1.0, 1.0])
    return np.minimum(lo * flip, hi * flip), np.maximum(lo * flip, hi * flip)


def _off_by(measured, predicted) -> float:
    """Largest distance (pixels) between the edges of a measured pixel box and a predicted one."""
    return float(np.abs(np.subtract(measured, predicted)).max())


AXIS_VIEWS = {"anterior": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),  # Slicer's default 3D view direction
              "superior": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0))}
"""Camera directions (RAS, from the focal point towards the camera) and view-up vectors."""


def test_rendered_surface_model_lies_where_its_ras_bounds_project(slicer_views, run_dir, tmp_path):
    from CTNeRFReconLib.surface import read_surface, run_surface

    result = run_surface(run_dir, tmp_path / "insert.vtp", "0.03")  # between the body and body + insert
    world = read_surface(result["path"])
    bounds = world.GetBounds()  # the engine's file: scanner frame, mm
    np.testing.assert_allclose(bounds, [10, 30, -20, -4, 1, 13], atol=1.5)  # the insert, CENTRE +- radii
    ras_lo, ras_hi = _ras_box(bounds)
    scene, three_d = slicer_views.scene, slicer_views.three_d
    model = ft.model_node_from_file(scene, result["path"])
    mixed_up = scene.AddNewNodeByClass("vtkMRMLModelNode", "world taken as RAS")  # as Slicer's generic loader
    mixed_up.SetAndObservePolyData(world)
    mixed_up.CreateDefaultDisplayNodes()
    decorations = three_d.node.GetBoxVisible(), three_d.node.GetAxisLabelsVisible()
    three_d.node.SetBoxVisible(0)
    three_d.node.SetAxisLabelsVisible(0)
    try:
        for name, (towards, up) in AXIS_VIEWS.items():
            three_d.look_from(towards, up, parallel_scale=40.0)  # 480 px for 80 mm: 6 px per mm
            assert three_d.renderer.GetActiveCamera().GetParallelProjection()
            # the camera shows Slicer's directions: from anterior, patient right on the left and S up;
            # from superior, A up
            o_col, o_row = three_d.display_point((0.0, 0.0, 0.0))
            if name == "anterior":
                assert three_d.display_point((10.0, 0.0, 0.0))[0] < o_col - 50
                assert three_d.display_point((0.0, 0.0, 10.0))[1] < o_row - 50
            else:
                assert three_d.display_point((0.0, 10.0, 0.0))[1] < o_row - 50
            shown = {}
            for which in (None, model, mixed_up):
                for node in (model, mixed_up):
                    node.GetDisplayNode().SetVisibility(node is which)
                shown[which] = three_d.render()
            sr.save_png(shown[model], tmp_path / f"model_{name}.png")
            sr.save_png(shown[mixed_up], tmp_path / f"model_world_as_ras_{name}.png")

            predicted = three_d.pixel_box_of_ras_box(ras_lo, ras_hi)
            box, count = sr.changed_box(shown[model], shown[None])
            assert box is not None, f"{name}: the model is not drawn"
            assert _off_by(box, predicted) <= PIXEL_TOLERANCE, (name, box, np.round(predicted, 2))
            area = (predicted[2] - predicted[0]) * (predicted[3] - predicted[1])
            assert 0.6 * area < count < area, (name, count, area)  # an ellipse fills pi/4 of its box
            # the check tells placements apart: 1 mm off, or x and y not negated, is out of tolerance
            for shift in np.eye(3):
                if abs(np.dot(shift, towards)) < 0.5:  # (moving along the view direction is invisible)
                    moved = three_d.pixel_box_of_ras_box(ras_lo + shift, ras_hi + shift)
                    assert _off_by(box, moved) > PIXEL_TOLERANCE
            wrong, _ = sr.changed_box(shown[mixed_up], shown[None])
            assert wrong is not None and _off_by(wrong, predicted) > 50, (name, wrong, np.round(predicted, 2))
            # (and it is drawn where its own, unmapped, bounds project: the measure follows the placement)
            as_is = three_d.pixel_box_of_ras_box(bounds[0::2], bounds[1::2])
            assert _off_by(wrong, as_is) <= PIXEL_TOLERANCE, (name, wrong, np.round(as_is, 2))
    finally:
        scene.RemoveNode(model)
        scene.RemoveNode(mixed_up)
        three_d.node.SetBoxVisible(decorations[0])
        three_d.node.SetAxisLabelsVisible(decorations[1])


def _show_alone(views: sr.SlicerViews, node):
    """The node as every slice view's only layer (the module's views.show_layers)."""
    slice_views.show_layers(views.scene, node, None, opacity=0.0)


def test_rendered_export_region_covers_the_rois_ras_extent(slicer_views, run_dir, tmp_path):
    from CTNeRFReconLib.field_export import export_region

    scene = slicer_views.scene
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "export box")  # as the user leaves it, in RAS
    roi.SetCenter(-12.0, 8.0, 4.0)
    roi.SetSize(20.0, 14.0, 10.0)
    ras_bounds = [0.0] * 6
    roi.GetRASBounds(ras_bounds)
    ras_lo, ras_hi = np.array(ras_bounds[0::2]), np.array(ras_bounds[1::2])
    centre, size = ft.box_from_roi_node(roi)
    nodes = []
    try:
        for name, box_centre in (("region", centre), ("ras_centre_as_world", (ras_lo + ras_hi) / 2)):
            result = export_region(run_dir, tmp_path / f"{name}.nrrd", box_centre, size, 1.0)
            volume = vn.load_volume_file(result["path"])
            node = vn.create_volume_node(scene, volume, name)
            # a fixed window with the body (0.02 /mm) well above black: the auto one puts it at black
            display = node.GetDisplayNode()
            display.SetAutoWindowLevel(False)
            display.SetWindowLevelMinMax(0.0, 0.05)
            nodes.append(node)
        region, mixed_up = nodes
        assert vn.grid_from_node(region).shape_xyz == (20, 14, 10)

        for view in slicer_views.slices.values():  # centred on the origin, 120 mm across, through the ROI
            view.node.SetFieldOfView(120.0, 120.0, 1.0)
            slice_to_ras = view.node.GetSliceToRAS()
            for r in range(3):
                slice_to_ras.SetElement(r, 3, 0.0)
            view.node.UpdateMatrices()
        slicer_views.jump_slices_to((ras_lo + ras_hi) / 2)
        for name, view in slicer_views.slices.items():
            _show_alone(slicer_views, region)
            image = view.render()
            _show_alone(slicer_views, mixed_up)
            wrong_image = view.render()
            sr.save_png(image, tmp_path / f"region_{name}.png")
            sr.save_png(wrong_image, tmp_path / f"region_ras_centre_as_world_{name}.png")
            predicted = view.pixel_box_of_ras_box(ras_lo, ras_hi)
            box, count = sr.changed_box(image, 0, threshold=30)  # not black
            assert box is not None, f"{name}: the region is not shown"
            assert _off_by(box, predicted) <= PIXEL_TOLERANCE, (name, box, np.round(predicted, 2))
            area = (predicted[2] - predicted[0] + 1) * (predicted[3] - predicted[1] + 1)
            assert count > 0.9 * area, (name, count, area)  # the whole box, not its outline
            # the check tells placements apart: 1 mm off in the view's plane, or the mixed-up export
            normal = view.xy_to_ras()[:3, 2]
            for shift in np.eye(3):
                if abs(np.dot(shift, normal)) < 1e-6:
                    assert _off_by(box, view.pixel_box_of_ras_box(ras_lo + shift, ras_hi + shift)) > PIXEL_TOLERANCE
            wrong, _ = sr.changed_box(wrong_image, 0, threshold=30)
            assert wrong is None or _off_by(wrong, predicted) > 20, (name, wrong, np.round(predicted, 2))
        assert vn.array_from_node(region).min() > 0.015  # the box lies inside the body: all of it non-zero
    finally:
        for node in [roi, *nodes]:
            scene.RemoveNode(node)


def _picture_panels(picture: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(first column, first row, last column, last row) of the image panels in the upper part of a
    projection check picture, left to right: the wide runs of columns with ink most of the way down."""
    top = picture[: int(0.6 * picture.shape[0])]
    ink = (top < 252).any(axis=-1)

    def runs(mask):
        edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
        return list(zip(edges[0::2], edges[1::2] - 1))

    panels = []
    for c0, c1 in runs(ink.sum(axis=0) > 0.3 * top.shape[0]):
        if c1 - c0 > 0.1 * picture.shape[1]:  # not a colour bar
            r0, r1 = max(runs(ink[:, c0:c1 + 1].mean(axis=1) > 0.9), key=lambda run: run[1] - run[0])
            panels.append((int(c0), int(r0), int(c1), int(r1)))
    return panels


def test_rendered_projection_check_reads_as_the_picture_on_disk(slicer_views, tmp_path):
    from PIL import Image
    from scipy.ndimage import map_coordinates

    import field_case as fc
    from CTNeRFReconLib.data import ScanData
    from CTNeRFReconLib.projection_check import projection_check

    geometry = fc.geometry(views=8, det=32)
    scan = ScanData(fc.projections(fc.PHANTOM, geometry).astype(np.float32), geometry, "synthetic", "<test>")
    grid = VolumeGrid.centered((20, 17, 15), (4.0,) * 3)
    result = projection_check(Volume(voxelize(fc.PHANTOM, grid, supersample=2), grid), scan,
                              tmp_path / "projection_check.png", view=3)
    with Image.open(result["path"]) as im:
        picture = np.asarray(im.convert("RGB"), dtype=np.float64)
    h, w, _ = picture.shape
    panels = _picture_panels(picture)
    assert len(panels) == 3, panels  # measured | rendered | difference
    for c0, r0, c1, r1 in panels:
        assert abs((c1 - c0) - (r1 - r0)) < 0.1 * (c1 - c0)  # square: the 32 x 32 detector

    scene = slicer_views.scene
    node = ft.projection_check_node(scene, result["path"])
    try:
        _show_alone(slicer_views, node)
        slicer_views.fit_slices()  # as the panel does (setSliceViewerLayers(..., fit=True))
        view = slicer_views.slices["Red"]
        image = view.render().astype(np.float64)
        sr.save_png(image, tmp_path / "projection_check_Red.png")

        # as on disk: the picture scaled to fit, centred on the origin, column 0 on the left, row 0 on top
        width, height, _ = view.node.GetDimensions()
        mm_per_pixel = view.node.GetFieldOfView()[0] / width
        o_col, o_row, _ = view.pixel_of_ras((0.0, 0.0, 0.0))
        cols, rows = np.meshgrid(np.arange(width), np.arange(height))
        u = (w - 1) / 2 + (cols - o_col) * mm_per_pixel
        v = (h - 1) / 2 + (rows - o_row) * mm_per_pixel
        inside = (u >= 1) & (u <= w - 2) & (v >= 1) & (v <= h - 2)
        assert inside.mean() > 0.5
        display = node.GetDisplayNode()
        low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()

        def expected(u, v):
            sampled = np.stack([map_coordinates(picture[..., k], [v, u], order=1, mode="nearest")
                                for k in range(3)], axis=-1)
            return np.clip(255.0 * (sampled - low) / (high - low), 0, 255)

        error = np.abs(image - expected(u, v))[inside]
        assert error.mean() < 3 and np.percentile(error, 99) < 40, (error.mean(), np.percentile(error, 99))
        mirrored = np.abs(image - expected(w - 1 - u, v))[inside]  # what the picture read mirrored gives
        flipped = np.abs(image - expected(u, h - 1 - v))[inside]
        assert mirrored.mean() > 5 * error.mean() and flipped.mean() > 5 * error.mean(), \
            (error.mean(), mirrored.mean(), flipped.mean())
        assert not image[~inside & (np.hypot(u - w / 2, v - h / 2) > 0.6 * w)].any()  # black around it

        # each panel is visible where the picture has it: measured and rendered in grey, the difference in colour
        for k, (c0, r0, c1, r1) in enumerate(panels):
            lo = (np.array([c0, r0]) + 4 - [(w - 1) / 2, (h - 1) / 2]) / mm_per_pixel + [o_col, o_row]
            hi = (np.array([c1, r1]) - 4 - [(w - 1) / 2, (h - 1) / 2]) / mm_per_pixel + [o_col, o_row]
            patch = image[int(np.ceil(lo[1])):int(hi[1]) + 1, int(np.ceil(lo[0])):int(hi[0]) + 1]
            assert patch.shape[0] > 40 and patch.shape[1] > 40, patch.shape
            assert patch.mean(axis=-1).std() > 10, (k, patch.mean(axis=-1).std())  # not constant
            colour = np.abs(patch[..., 0] - patch[..., 2])
            if k < 2:
                assert np.percentile(colour, 99) < 10, (k, np.percentile(colour, 99))  # grey
                assert patch.mean(axis=-1).std() > 40  # the bright body on black
            else:
                assert (colour > 40).mean() > 0.05, (k, (colour > 40).mean())  # red and blue
    finally:
        scene.RemoveNode(node)
