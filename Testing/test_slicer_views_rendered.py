"""What users see, rendered by Slicer itself: a real run streamed into a real scene, drawn by Slicer's views.

The engine reconstructs the small ellipsoid case (a body with one bright off-centre ellipsoid) with FDK in
a worker process; the bridge's ReconstructionSession streams it into slicer-core's vtkMRMLScene, and
Slicer's own slice logics and displayable managers (Red, Yellow, Green) and 3D view logic with volume
rendering draw it offscreen (Testing/slicer_render.py). Checked on the pixels:

(a) each slice view shows the volume through the window/level the bridge set: every pixel is the
    volume, resampled at the pixel's RAS point, mapped through that window (and moving the window
    changes the pixels);
(b) the bright feature appears at the pixel that its RAS point, diag(-1, -1, 1) times its scanner
    position, gives through the inverse of the slice node's XYToRAS, in all three views;
(c) the compare step's layers (views.show_layers: the reconstruction under the reference or the
    difference, one foreground opacity) blend as the opacity says;
(d) the 3D view's volume rendering follows its display node: hidden, it leaves the render exactly as
    without it; shown with the attenuation transfer functions (slicer_bridge.rendering) the object
    and the feature appear where the camera projects them, and a new slice window/level changes the
    rendering (so does Slicer's own following of the window, the module's Show in 3D).

Skipped, with the reason, where slicer-core or an offscreen OpenGL (EGL) driver is missing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core package (a real vtkMRMLScene) is not installed")

import bridge_case as bc  # noqa: E402
import slicer_render as sr  # noqa: E402
from CTNeRFReconLib.methods import method_names  # noqa: E402
from CTNeRFReconLib.slicer_bridge import rendering, views  # noqa: E402
from CTNeRFReconLib.slicer_bridge import volume_nodes as vn  # noqa: E402
from CTNeRFReconLib.slicer_bridge.session import SessionState  # noqa: E402


def _have_fdk() -> bool:
    try:
        return "fdk" in method_names()
    except ImportError:  # a method module is being rewritten
        return False


pytestmark = pytest.mark.skipif(not _have_fdk(), reason="the engine's fdk method is not available")


@dataclass
class Rendered:
    scene: object
    views: sr.SlicerViews
    session: object
    reference: object

    @property
    def recon(self):
        return self.session.output_node


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    sr.require_offscreen()
    folder = tmp_path_factory.mktemp("rendered_case")
    case = bc.write_case(folder / "case")
    scene = slicer.vtkMRMLScene()
    slicer_views = sr.SlicerViews(scene)  # the application is up before any data, as in Slicer
    reference = vn.create_volume_node(scene, vn.load_volume_file(case / "reference.nrrd"), "reference")
    session = bc.run_session(scene, case, folder / "run", "fdk", reference_node=reference)
    assert session.state is SessionState.FINISHED, session.message
    assert session.difference_node is not None
    views.show_layers(scene, session.output_node, None, opacity=0.0)  # what the module does on the first volume
    slicer_views.fit_slices()
    slicer_views.jump_slices_to(bc.feature_ras())
    yield Rendered(scene, slicer_views, session, reference)
    slicer_views.close()


# ---------------------------------------------------------------------------------------------- helpers

def pixel_ras(view: sr.SliceView) -> np.ndarray:
    """RAS point of every pixel of a slice view's render, (rows, cols, 3), row 0 at the top."""
    width, height, _ = view.node.GetDimensions()
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    xy = np.stack([cols, height - 1 - rows, np.zeros_like(cols), np.ones_like(cols)], axis=-1).astype(float)
    return (xy @ view.xy_to_ras().T)[..., :3]


def sample_node(node, ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The node's voxels linearly interpolated at RAS points, and where the points lie inside its grid."""
    from scipy.ndimage import map_coordinates

    array = vn.array_from_node(node)
    ras_to_ijk = np.linalg.inv(vn.node_ijk_to_ras(node))
    flat = ras.reshape(-1, 3)
    ijk = (np.c_[flat, np.ones(len(flat))] @ ras_to_ijk.T)[:, :3]
    shape_xyz = np.array(array.shape[::-1])
    inside = np.all((ijk >= 0.5) & (ijk <= shape_xyz - 1.5), axis=1)  # away from the edge voxels
    values = map_coordinates(array, ijk[:, ::-1].T, order=1, mode="nearest")
    return values.reshape(ras.shape[:-1]), inside.reshape(ras.shape[:-1])


def windowed_grey(values: np.ndarray, node) -> np.ndarray:
    """Grey level Slicer's Grey colour table gives values through the node's display window."""
    display = node.GetDisplayNode()
    low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    return 255.0 * np.clip((values - low) / (high - low), 0.0, 1.0)


def grey(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64).mean(axis=-1)


def inside_ellipsoid(ras: np.ndarray, centre_world, radii, shrink: float = 1.0) -> np.ndarray:
    world = vn.ras_to_world(ras)
    return (((world - np.asarray(centre_world)) / (np.asarray(radii) * shrink)) ** 2).sum(axis=-1) <= 1.0


def bright_centroid(image: np.ndarray, threshold: float) -> tuple[float, float, int]:
    rows, cols = np.nonzero(image > threshold)
    return float(cols.mean()) if len(cols) else np.nan, float(rows.mean()) if len(rows) else np.nan, len(cols)


# -------------------------------------------------------------------------------------------- (a)

@pytest.mark.parametrize("name", list(sr.SLICE_VIEWS))
def test_slice_view_shows_the_volume_through_the_bridges_window(rendered, name):
    view = rendered.views.slices[name]
    recon = rendered.recon
    assert view.composite.GetBackgroundVolumeID() == recon.GetID()
    assert view.node.GetOrientation() == sr.SLICE_VIEWS[name][0]
    display = recon.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    low, high = vn.window_for(vn.array_from_node(recon), "auto", vn.Units.MU)  # the bridge's first window
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((low, high))

    image = grey(view.render())
    assert image.shape == (320, 320)
    ras = pixel_ras(view)
    values, inside = sample_node(recon, ras)
    assert inside.mean() > 0.3
    expected = windowed_grey(values, recon)
    error = np.abs(image - expected)[inside]
    # Slicer's pixels are this interpolation and window to within rounding (1 grey level)
    assert error.mean() < 1.0 and np.percentile(error, 99) < 3, (error.mean(), np.percentile(error, 99))

    # the object is bright, the air around it dark, as the window puts them
    body = inside & inside_ellipsoid(ras, (0, 0, 0), bc.BODY_RADII, 0.8) & \
        ~inside_ellipsoid(ras, bc.FEATURE_WORLD, bc.FEATURE_RADII, 1.6)
    air = inside & ~inside_ellipsoid(ras, (0, 0, 0), bc.BODY_RADII, 1.2)
    assert body.sum() > 1000 and air.sum() > 500
    body_grey = 255 * (bc.BODY_MU - low) / (high - low)
    assert abs(np.median(image[body]) - body_grey) < 20, (np.median(image[body]), body_grey)
    assert np.median(image[air]) < 50 and np.median(image[body]) > 180

    # a new window is what the view shows next (here a narrow soft-tissue window: the body saturates)
    old = (display.GetWindowLevelMin(), display.GetWindowLevelMax())
    try:
        vn.set_window(recon, "soft_tissue")
        narrow = grey(view.render())
        expected = windowed_grey(values, recon)
        assert np.abs(narrow - expected)[inside].mean() < 1.0
        assert np.abs(narrow - image)[body].mean() > 10
    finally:
        display.SetWindowLevelMinMax(*old)


def test_repeat_renders_are_identical(rendered):
    first = rendered.views.render_slice("Red")
    assert np.array_equal(first, rendered.views.render_slice("Red"))


# -------------------------------------------------------------------------------------------- (b)

@pytest.mark.parametrize("name", list(sr.SLICE_VIEWS))
def test_the_feature_appears_at_the_pixel_its_ras_point_predicts(rendered, name):
    view = rendered.views.slices[name]
    recon = rendered.recon
    ras = bc.feature_ras()
    np.testing.assert_allclose(ras, [-bc.FEATURE_WORLD[0], -bc.FEATURE_WORLD[1], bc.FEATURE_WORLD[2]])
    col, row, depth = view.pixel_of_ras(ras)
    assert abs(depth) < 1e-6  # the views were jumped to the feature
    width, height, _ = view.node.GetDimensions()
    assert 0 <= col < width and 0 <= row < height

    display = recon.GetDisplayNode()
    old = (display.GetWindowLevelMin(), display.GetWindowLevelMax())
    try:
        # a window above the body's attenuation: only the feature is bright
        display.SetWindowLevelMinMax(bc.BODY_MU + 0.25 * bc.FEATURE_MU, bc.BODY_MU + 0.75 * bc.FEATURE_MU)
        image = grey(view.render())
    finally:
        display.SetWindowLevelMinMax(*old)
    found_col, found_row, count = bright_centroid(image, 127)
    mm_per_pixel = view.node.GetFieldOfView()[0] / width
    voxel_px = max(recon.GetSpacing()) / mm_per_pixel
    assert count > 0.5 * np.pi * (0.5 * min(bc.FEATURE_RADII) / mm_per_pixel) ** 2, count
    assert np.hypot(found_col - col, found_row - row) < voxel_px, ((found_col, found_row), (col, row), voxel_px)


def test_axial_view_has_anterior_up_and_patient_right_on_the_left(rendered):
    view = rendered.views.slices["Red"]
    centre = np.array(view.pixel_of_ras([0.0, 0.0, bc.feature_ras()[2]])[:2])
    anterior = np.array(view.pixel_of_ras([0.0, 30.0, bc.feature_ras()[2]])[:2])
    right = np.array(view.pixel_of_ras([30.0, 0.0, bc.feature_ras()[2]])[:2])
    assert anterior[1] < centre[1] and abs(anterior[0] - centre[0]) < 1e-6  # up on the screen
    assert right[0] < centre[0] and abs(right[1] - centre[1]) < 1e-6  # left on the screen


# -------------------------------------------------------------------------------------------- (c)

def _layers(rendered, name, foreground, opacity):
    views.show_layers(rendered.scene, rendered.recon, foreground, opacity=opacity)
    return grey(rendered.views.render_slice(name))


def test_the_reference_overlay_blends_at_the_compare_opacity(rendered):
    name = "Red"
    try:
        alone = _layers(rendered, name, None, 0.0)
        hidden = _layers(rendered, name, rendered.reference, 0.0)
        half = _layers(rendered, name, rendered.reference, 0.5)
        full = _layers(rendered, name, rendered.reference, 1.0)
        for composite in views.slice_composite_nodes(rendered.scene):
            assert composite.GetForegroundVolumeID() == rendered.reference.GetID()
            assert composite.GetForegroundOpacity() == 1.0 and composite.GetLinkedControl()
        views.show_layers(rendered.scene, rendered.reference, None, opacity=0.0)
        reference_alone = grey(rendered.views.render_slice(name))
    finally:
        views.show_layers(rendered.scene, rendered.recon, None, opacity=0.0)
    assert np.abs(hidden - alone).max() <= 1
    assert np.abs(full - reference_alone).max() <= 1
    assert np.abs(full - alone).mean() > 3  # the two layers differ (FDK streaks, blur)
    inside = sample_node(rendered.recon, pixel_ras(rendered.views.slices[name]))[1]
    assert np.abs(half - 0.5 * (alone + full))[inside].max() <= 2

    # the reference lies where the reconstruction does: its bright feature is on the same pixels
    display = rendered.reference.GetDisplayNode()
    old = (display.GetWindowLevelMin(), display.GetWindowLevelMax())
    try:
        display.SetWindowLevelMinMax(bc.BODY_MU + 0.25 * bc.FEATURE_MU, bc.BODY_MU + 0.75 * bc.FEATURE_MU)
        only_feature = _layers(rendered, name, rendered.reference, 1.0)
    finally:
        display.SetWindowLevelMinMax(*old)
        views.show_layers(rendered.scene, rendered.recon, None, opacity=0.0)
    col, row, _ = rendered.views.slices[name].pixel_of_ras(bc.feature_ras())
    ref_col, ref_row, count = bright_centroid(only_feature, 127)
    assert count > 100 and np.hypot(ref_col - col, ref_row - row) < 3, ((ref_col, ref_row), (col, row))


def test_the_difference_overlay_shows_recon_minus_reference(rendered):
    name = "Green"
    difference = rendered.session.difference_node
    view = rendered.views.slices[name]
    try:
        image = _layers(rendered, name, difference, 1.0)
        flicked = _layers(rendered, name, difference, views.flicked(1.0))
    finally:
        views.show_layers(rendered.scene, rendered.recon, None, opacity=0.0)
    ras = pixel_ras(view)
    values, inside = sample_node(difference, ras)
    display = difference.GetDisplayNode()
    assert display.GetWindowLevelMin() == pytest.approx(-display.GetWindowLevelMax())  # symmetric about 0
    expected = windowed_grey(values, difference)
    assert np.abs(image - expected)[inside].mean() < 1.0
    assert abs(np.median(image[inside & (np.abs(values) < 1e-4)]) - 127.5) < 3  # no difference: mid grey
    recon_alone = windowed_grey(sample_node(rendered.recon, ras)[0], rendered.recon)
    assert np.abs(flicked - recon_alone)[inside].mean() < 1.0  # the flick: the reconstruction alone


# -------------------------------------------------------------------------------------------- (d)

def _display_point(view: sr.ThreeDView, ras) -> tuple[float, float]:
    """Where the 3D view's camera puts a RAS point: (column, row) in the render, row 0 at the top."""
    renderer = view.renderer
    renderer.SetWorldPoint(*[float(v) for v in ras], 1.0)
    renderer.WorldToDisplay()
    x, y, _ = renderer.GetDisplayPoint()
    return x, view.window.GetSize()[1] - 1 - y


def test_volume_rendering_follows_its_display_node(rendered):
    three_d = rendered.views.three_d
    logic = rendered.views.volume_rendering_logic
    recon = rendered.recon
    three_d.reset_camera()
    empty = three_d.render()
    assert np.array_equal(empty, three_d.render())

    display = rendering.show_attenuation_rendering(logic, recon)
    assert display is not None and display.GetVisibility() and not display.GetFollowVolumeDisplayNode()
    assert display.IsDisplayableInView(three_d.node.GetID())
    shown = three_d.render()
    changed = np.abs(shown.astype(int) - empty).sum(axis=-1) > 6
    body_col, body_row = _display_point(three_d, [0.0, 0.0, 0.0])
    edge_col, _ = _display_point(three_d, [bc.BODY_RADII[0], 0.0, 0.0])
    radius_px = abs(edge_col - body_col)
    rows, cols = np.nonzero(changed)
    assert len(rows) > 0.5 * np.pi * radius_px ** 2, (len(rows), radius_px)
    assert np.hypot(cols.mean() - body_col, rows.mean() - body_row) < 0.2 * radius_px

    # the transfer functions follow the slice window/level: a new window, a new rendering; back, the same
    window = recon.GetDisplayNode()
    old = (window.GetWindowLevelMin(), window.GetWindowLevelMax())
    try:
        window.SetWindowLevelMinMax(old[0] + 0.5 * (old[1] - old[0]), old[1])
        narrowed = three_d.render()
        assert (np.abs(narrowed.astype(int) - shown).sum(axis=-1) > 6).sum() > 0.1 * np.pi * radius_px ** 2
    finally:
        window.SetWindowLevelMinMax(*old)
    assert np.array_equal(three_d.render(), shown)

    # only the bright feature (a window above the body): it shows where the camera projects its RAS point
    rendering.show_attenuation_rendering(logic, recon, window=(bc.BODY_MU + 0.2 * bc.FEATURE_MU,
                                                              bc.BODY_MU + 0.6 * bc.FEATURE_MU),
                                         threshold_fraction=0.0, max_opacity=1.0)
    feature = three_d.render()
    rows, cols = np.nonzero(np.abs(feature.astype(int) - empty).sum(axis=-1) > 30)
    col, row = _display_point(three_d, bc.feature_ras())
    assert len(rows) > 50
    assert np.hypot(cols.mean() - col, rows.mean() - row) < 0.1 * radius_px, ((cols.mean(), rows.mean()), (col, row))

    # hidden: exactly the render without it
    rendering.show_attenuation_rendering(logic, recon, show=False)
    assert not display.GetVisibility()
    assert np.array_equal(three_d.render(), empty)

    # the module's Show in 3D: transfer functions that follow the slice window/level
    display = rendered.views.show_volume_rendering(recon, True, follow_display=True)
    assert display.GetFollowVolumeDisplayNode()
    followed = three_d.render()
    assert (np.abs(followed.astype(int) - empty).sum(axis=-1) > 6).sum() > 0.5 * np.pi * radius_px ** 2
    try:
        window.SetWindowLevelMinMax(old[0], old[0] + 0.5 * (old[1] - old[0]))
        assert not np.array_equal(three_d.render(), followed)
    finally:
        window.SetWindowLevelMinMax(*old)
        rendered.views.show_volume_rendering(recon, False)
    assert np.array_equal(three_d.render(), empty)


def test_attenuation_transfer_points_come_from_the_window():
    transfer = rendering.transfer_from_window(0.0, 0.02)
    assert transfer.threshold == pytest.approx(0.009) and transfer.top == 0.02 and transfer.max_opacity == 0.15
    assert rendering.transfer_from_window(-0.01, 0.03, 0.25, 1.0).threshold == pytest.approx(0.0)
    for bad in [(0.02, 0.02), (0.0, 0.02, 1.0), (0.0, 0.02, 0.5, 0.0), (0.0, 0.02, 0.5, 1.5)]:
        with pytest.raises(ValueError):
            rendering.transfer_from_window(*bad)
