"""Slicer's own slice views and 3D view, rendered offscreen without the application (test and doc tooling).

The ``slicer-core`` package holds Slicer's MRML scene, logics and displayable managers but not its Qt
widgets. A Slicer view widget is a thin shell around them, and this module rebuilds that shell with
plain VTK, the way Slicer's own classes set it up (Libs/MRML/Widgets in Slicer's sources):

* the application: a ``vtkSlicerApplicationLogic`` on the scene, with the Colors module's logic as
  its colour logic (it adds the default colour tables, e.g. the Grey table every scalar volume display
  node uses) and the Volume Rendering module's logic registered as module "VolumeRendering"; both
  displayable-manager factories know the application logic (qSlicerCoreApplication does this);
* a slice view (qMRMLSliceWidget, qMRMLSliceView): a ``vtkMRMLSliceLogic`` with its slice node
  (Red axial, Yellow sagittal, Green coronal, as Slicer's layouts set them), whose blended,
  window/levelled image is drawn 1:1 into the view by a ``vtkImageMapper`` (CTK's light box renderer
  manager does this), and the slice view displayable managers Slicer registers;
* the 3D view (qMRMLThreeDView): a ``vtkMRMLViewLogic`` with its view node and camera, the 3D
  displayable managers Slicer registers plus the Volume Rendering module's (GPU ray cast; Mesa's
  llvmpipe when there is no GPU).

Each view has its own offscreen ``vtkRenderWindow`` with an initialised interactor (a displayable
manager group needs one), read back with ``vtkWindowToImageFilter``. Renders come back as numpy RGB
arrays, row 0 at the top, as the view shows them on screen.

It needs an OpenGL context without a display: VTK's EGL window with Mesa (Debian packages
``libegl1 libegl-mesa0 libgl1-mesa-dri``). :func:`offscreen_problem` tries it once in a
subprocess (a missing driver can abort a process), so tests can skip with the reason.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
"""VTK's X11 window is its first choice; without a display it warns and falls back to EGL. Ask for EGL."""

SLICE_VIEWS = {"Red": ("Axial", (0.953, 0.290, 0.200)),
               "Yellow": ("Sagittal", (0.929, 0.835, 0.298)),
               "Green": ("Coronal", (0.431, 0.690, 0.294))}
"""Slice views of Slicer's layouts: orientation and the view colour (#F34A33, #EDD54C, #6EB04B)."""

SLICE_DISPLAYABLE_MANAGERS = ("vtkMRMLVolumeGlyphSliceDisplayableManager", "vtkMRMLModelSliceDisplayableManager",
                              "vtkMRMLCrosshairDisplayableManager", "vtkMRMLOrientationMarkerDisplayableManager",
                              "vtkMRMLRulerDisplayableManager", "vtkMRMLScalarBarDisplayableManager")
"""What qMRMLSliceView registers."""

THREED_DISPLAYABLE_MANAGERS = ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
                               "vtkMRMLModelDisplayableManager", "vtkMRMLThreeDReformatDisplayableManager",
                               "vtkMRMLThreeDSliceEdgeDisplayableManager", "vtkMRMLCrosshairDisplayableManager3D",
                               "vtkMRMLOrientationMarkerDisplayableManager", "vtkMRMLRulerDisplayableManager",
                               "vtkMRMLVolumeRenderingDisplayableManager")
"""What qMRMLThreeDView registers, and the Volume Rendering module's manager (qSlicerVolumeRenderingModule)."""

_PROBE = """
import os
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
from vtkmodules.vtkRenderingCore import vtkRenderWindow, vtkRenderer, vtkWindowToImageFilter
import vtkmodules.vtkRenderingOpenGL2
window = vtkRenderWindow()
window.SetOffScreenRendering(1)
renderer = vtkRenderer()
renderer.SetBackground(1.0, 0.0, 0.0)
window.AddRenderer(renderer)
window.SetSize(8, 8)
window.Render()
grab = vtkWindowToImageFilter()
grab.SetInput(window)
grab.Update()
print("pixel", grab.GetOutput().GetScalarComponentAsDouble(4, 4, 0, 0), window.GetClassName())
"""


@lru_cache(maxsize=1)
def offscreen_problem() -> str | None:
    """None when VTK renders offscreen here, else why not (for a skip reason)."""
    try:
        import slicer  # noqa: F401
    except ImportError:
        return "the slicer-core package (Slicer's MRML scene and logics) is not installed"
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "VTK_DEFAULT_OPENGL_WINDOW":
                                   os.environ.get("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")})
    except subprocess.TimeoutExpired:
        return "an offscreen VTK render did not finish within 120 s"
    line = next((s for s in done.stdout.splitlines() if s.startswith("pixel ")), None)
    if done.returncode != 0 or line is None or float(line.split()[1]) != 255.0:
        text = re.sub(r"\x1b\[[0-9;]*m", "", done.stderr or done.stdout)  # VTK's log colours
        tail = [line.strip() for line in text.strip().splitlines()[-3:]]
        return ("VTK cannot render offscreen here (no EGL/OpenGL driver: install libegl1 libegl-mesa0 "
                f"libgl1-mesa-dri): exit {done.returncode}: {' | '.join(tail)}")
    return None


def require_offscreen():
    """Skip the calling test when offscreen rendering is not available."""
    import pytest

    problem = offscreen_problem()
    if problem:
        pytest.skip(problem)


def grab(window) -> np.ndarray:
    """A rendered vtkRenderWindow's pixels: RGB rows, row 0 at the top as on screen."""
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    grab = vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    nx, ny, _ = image.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1)[:, :, :3]
    return np.ascontiguousarray(rgb[::-1])  # VTK's row 0 is the bottom; the screen's is the top


def _offscreen_window(size):
    from vtkmodules.vtkRenderingCore import vtkRenderer, vtkRenderWindow, vtkRenderWindowInteractor
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (the OpenGL window and mappers)
    import vtkmodules.vtkRenderingVolumeOpenGL2  # noqa: F401  (the GPU ray cast mapper)
    import vtkmodules.vtkRenderingContextOpenGL2  # noqa: F401
    import vtkmodules.vtkRenderingFreeType  # noqa: F401  (text of rulers and markers)

    window = vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(0)
    window.SetSize(*size)
    renderer = vtkRenderer()
    window.AddRenderer(renderer)
    interactor = vtkRenderWindowInteractor()  # never started; displayable managers need one to exist
    interactor.SetRenderWindow(window)
    interactor.Initialize()
    return window, renderer, interactor


def _pixel_box(pixels) -> tuple[float, float, float, float]:
    """(first column, first row, last column, last row) around (column, row) points."""
    pixels = np.asarray(pixels, dtype=float)
    (c0, r0), (c1, r1) = pixels.min(axis=0), pixels.max(axis=0)
    return float(c0), float(r0), float(c1), float(r1)


@dataclass
class SliceView:
    """One slice view: its logic, slice node and the offscreen window it is drawn into."""

    name: str
    logic: object
    node: object
    window: object
    renderer: object
    interactor: object
    managers: object
    mapper: object

    @property
    def composite(self):
        return self.logic.GetSliceCompositeNode()

    def xy_to_ras(self) -> np.ndarray:
        m = self.node.GetXYToRAS()
        return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])

    def pixel_of_ras(self, ras) -> tuple[float, float, float]:
        """(column, row, distance from the slice plane in mm) of a RAS point in this view's render.

        The slice node's XYToRAS maps view pixel (x, y, 0) to RAS with y up from the bottom edge;
        the render's row 0 is the top, so row = height - 1 - y.
        """
        xy = np.linalg.solve(self.xy_to_ras(), np.append(np.asarray(ras, dtype=float), 1.0))
        height = self.node.GetDimensions()[1]
        normal = self.xy_to_ras()[:3, 2]
        return float(xy[0]), float(height - 1 - xy[1]), float(xy[2] * np.linalg.norm(normal))

    def pixel_box_of_ras_box(self, ras_lo, ras_hi) -> tuple[float, float, float, float]:
        """(first column, first row, last column, last row) of the pixels a RAS box covers in this
        view, fractional: the in-plane box around its eight corners through :meth:`pixel_of_ras`
        (pixel index = pixel centre, as :func:`changed_box` counts)."""
        return _pixel_box([self.pixel_of_ras(corner)[:2] for corner in box_corners(ras_lo, ras_hi)])

    def render(self) -> np.ndarray:
        # the logic replaces its output connection when its layers change (Slicer's slice controller
        # re-plugs the view on imageDataConnectionChanged); plug in the current one
        connection = self.logic.GetImageDataConnection()
        if self.mapper.GetInputConnection(0, 0) is not connection:
            self.mapper.SetInputConnection(connection)
        self.window.Render()
        return grab(self.window)


@dataclass
class ThreeDView:
    """The 3D view: its logic, view node, camera and offscreen window."""

    logic: object
    node: object
    window: object
    renderer: object
    interactor: object
    managers: object

    def render(self) -> np.ndarray:
        self.window.Render()
        return grab(self.window)

    def reset_camera(self, zoom: float = 1.0):
        """Centre the camera on what is shown, from its current direction (Slicer's 'Center view')."""
        box, labels = self.node.GetBoxVisible(), self.node.GetAxisLabelsVisible()
        self.node.SetBoxVisible(0)
        self.node.SetAxisLabelsVisible(0)
        self.window.Render()
        self.renderer.ResetCamera()
        self.renderer.GetActiveCamera().Zoom(zoom)
        self.renderer.ResetCameraClippingRange()
        self.node.SetBoxVisible(box)
        self.node.SetAxisLabelsVisible(labels)

    @property
    def camera_node(self):
        """The vtkMRMLCameraNode the camera displayable manager made for this view (its camera is the
        renderer's active camera)."""
        cameras = self.node.GetScene().GetNodesByClass("vtkMRMLCameraNode")
        for i in range(cameras.GetNumberOfItems()):
            camera = cameras.GetItemAsObject(i)
            if camera.GetLayoutName() == self.node.GetLayoutName():
                return camera
        raise LookupError(f"no camera node for 3D view {self.node.GetLayoutName()!r}")

    def look_from(self, towards_camera, view_up, focal=(0.0, 0.0, 0.0), parallel_scale: float | None = None,
                  distance: float = 500.0):
        """A known camera, set on the view's camera node as Slicer's view controllers do: looking at
        ``focal`` (RAS) from ``focal + distance * towards_camera``, ``view_up`` up the screen. With
        ``parallel_scale`` (mm, half the view's height) the view node's render mode is Orthographic
        (parallel projection), else Perspective. Returns the camera node."""
        import slicer

        direction = np.asarray(towards_camera, dtype=float)
        direction = direction / np.linalg.norm(direction)
        focal = np.asarray(focal, dtype=float)
        self.node.SetRenderMode(slicer.vtkMRMLViewNode.Orthographic if parallel_scale is not None
                                else slicer.vtkMRMLViewNode.Perspective)
        camera_node = self.camera_node
        camera_node.SetFocalPoint(*focal)
        camera_node.SetPosition(*(focal + distance * direction))
        camera_node.SetViewUp(*[float(v) for v in view_up])
        if parallel_scale is not None:
            camera_node.GetCamera().ParallelProjectionOn()
            camera_node.GetCamera().SetParallelScale(float(parallel_scale))
        self.window.Render()  # let the displayable managers apply the render mode
        self.renderer.ResetCameraClippingRange()
        return camera_node

    def display_point(self, ras) -> tuple[float, float]:
        """(column, row) of a RAS point in this view's render through the renderer's camera
        (vtkRenderer.WorldToDisplay), row 0 at the top, pixel index = pixel centre."""
        self.renderer.SetWorldPoint(*[float(v) for v in ras], 1.0)
        self.renderer.WorldToDisplay()
        x, y, _ = self.renderer.GetDisplayPoint()
        return float(x - 0.5), float(self.window.GetSize()[1] - y - 0.5)

    def pixel_box_of_ras_box(self, ras_lo, ras_hi) -> tuple[float, float, float, float]:
        """(first column, first row, last column, last row), fractional, of the RAS box's eight
        corners through the camera: where a model with those RAS bounds appears (exactly so for a
        parallel projection along an axis)."""
        return _pixel_box([self.display_point(corner) for corner in box_corners(ras_lo, ras_hi)])


class SlicerViews:
    """Slicer's Red, Yellow and Green slice views and a 3D view on a scene, rendered offscreen.

    Make it before the volumes are loaded, as Slicer starts before data: the colour logic adds the
    colour tables that new volume display nodes refer to.
    """

    def __init__(self, scene, slice_size=(320, 320), view_size=(480, 480)):
        problem = offscreen_problem()
        if problem:
            raise RuntimeError(problem)
        import slicer
        from vtkmodules.vtkCommonCore import vtkCollection

        self.scene = scene
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(scene)
        self.color_logic = slicer.vtkSlicerColorLogic()
        self.color_logic.SetMRMLApplicationLogic(self.app_logic)
        self.color_logic.SetMRMLScene(scene)
        self.app_logic.SetColorLogic(self.color_logic)
        self.app_logic.SetModuleLogic("Colors", self.color_logic)
        self.volume_rendering_logic = slicer.vtkSlicerVolumeRenderingLogic()
        self.volume_rendering_logic.SetMRMLApplicationLogic(self.app_logic)
        self.volume_rendering_logic.SetMRMLScene(scene)
        self.app_logic.SetModuleLogic("VolumeRendering", self.volume_rendering_logic)

        slice_factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        view_factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
        for factory, names in ((slice_factory, SLICE_DISPLAYABLE_MANAGERS),
                               (view_factory, THREED_DISPLAYABLE_MANAGERS)):
            factory.SetMRMLApplicationLogic(self.app_logic)
            for name in names:  # (a manager newer than this slicer-core is left out)
                if (not factory.IsDisplayableManagerRegistered(name)
                        and slicer.vtkMRMLDisplayableManagerGroup.IsADisplayableManager(name)):
                    factory.RegisterDisplayableManager(name)

        self.slice_logics = vtkCollection()
        self.app_logic.SetSliceLogics(self.slice_logics)
        self.slices: dict[str, SliceView] = {}
        for name, (orientation, color) in SLICE_VIEWS.items():
            self.slices[name] = self._slice_view(slice_factory, name, orientation, color, slice_size)

        self.view_logics = vtkCollection()
        self.app_logic.SetViewLogics(self.view_logics)
        self.three_d = self._three_d_view(view_factory, view_size)

    # ------------------------------------------------------------------------------- set-up

    def _slice_view(self, factory, name, orientation, color, size) -> SliceView:
        import slicer
        from vtkmodules.vtkRenderingCore import vtkActor2D, vtkImageMapper

        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(self.app_logic)
        logic.SetMRMLScene(self.scene)
        node = logic.AddSliceNode(name)
        node.SetOrientation(orientation)  # AddSliceNode leaves it "Reformat"; Slicer's layout sets it
        node.SetDefaultOrientation(orientation)
        node.SetLayoutColor(*color)
        node.SetLayoutLabel(name[0])
        node.SetDimensions(size[0], size[1], 1)
        self.slice_logics.AddItem(logic)
        window, renderer, interactor = _offscreen_window(size)
        renderer.SetBackground(0.0, 0.0, 0.0)
        mapper = vtkImageMapper()  # the slice image 1:1 in the view, as CTK's light box manager draws it
        mapper.SetColorWindow(255.0)
        mapper.SetColorLevel(127.5)
        mapper.SetInputConnection(logic.GetImageDataConnection())
        actor = vtkActor2D()
        actor.SetMapper(mapper)
        renderer.AddViewProp(actor)
        managers = factory.InstantiateDisplayableManagers(renderer)
        managers.SetMRMLDisplayableNode(node)
        logic.SetDisplayableManagerGroup(managers)  # qMRMLLayoutSliceViewFactory does this
        return SliceView(name, logic, node, window, renderer, interactor, managers, mapper)

    def _three_d_view(self, factory, size) -> ThreeDView:
        import slicer

        logic = slicer.vtkMRMLViewLogic()
        logic.SetMRMLApplicationLogic(self.app_logic)
        logic.SetMRMLScene(self.scene)
        node = logic.AddViewNode("1")
        node.SetName("View1")
        node.SetLayoutLabel("1")
        self.view_logics.AddItem(logic)
        window, renderer, interactor = _offscreen_window(size)
        managers = factory.InstantiateDisplayableManagers(renderer)
        managers.SetMRMLDisplayableNode(node)
        logic.SetDisplayableManagerGroup(managers)
        return ThreeDView(logic, node, window, renderer, interactor, managers)

    # --------------------------------------------------------------------------------- use

    def fit_slices(self):
        """Fit every slice view to its volumes (Slicer's 'reset field of view', as setSliceViewerLayers(fit=True))."""
        for view in self.slices.values():
            width, height, _ = view.node.GetDimensions()
            view.logic.FitSliceToAll(width, height)
            view.logic.SnapSliceOffsetToIJK()

    def jump_slices_to(self, ras):
        """Put every slice view's plane through a RAS point (Slicer's 'jump slices', offset only)."""
        for view in self.slices.values():
            view.node.JumpSliceByOffsetting(*[float(v) for v in ras])

    def render_slice(self, name: str) -> np.ndarray:
        return self.slices[name].render()

    def render_slices(self) -> dict[str, np.ndarray]:
        return {name: view.render() for name, view in self.slices.items()}

    def render_3d(self) -> np.ndarray:
        return self.three_d.render()

    def show_volume_rendering(self, volume_node, show: bool = True, follow_display: bool = True):
        """The module's Show in 3D: a volume rendering display node whose transfer functions follow the
        slice window/level (CTNeRFRecon.py's showVolumeRendering does the same with Slicer's logic)."""
        from CTNeRFReconLib.slicer_bridge.rendering import volume_rendering_display

        display = volume_rendering_display(self.volume_rendering_logic, volume_node, create=show)
        if display is None:
            return None
        if show:
            display.SetFollowVolumeDisplayNode(follow_display)
        display.SetVisibility(show)
        return display

    def close(self):
        """Release the OpenGL contexts (a test makes several of these)."""
        for view in [*self.slices.values(), self.three_d]:
            view.managers.SetMRMLDisplayableNode(None)
            view.window.Finalize()
            view.interactor.TerminateApp()
        self.slices.clear()


def box_corners(lo, hi) -> np.ndarray:
    """The eight corners (8, 3) of the axis-aligned box lo..hi."""
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    return np.array([[(lo, hi)[a][0], (lo, hi)[b][1], (lo, hi)[c][2]]
                     for a in (0, 1) for b in (0, 1) for c in (0, 1)])


def changed_box(image: np.ndarray, base: np.ndarray, threshold: float = 6.0):
    """(first column, first row, last column, last row) of the pixels where ``image`` differs from
    ``base`` (sum over R, G, B of the absolute differences above ``threshold``), and how many;
    (None, 0) when none do. ``base`` may be a scalar: 0 finds what is not black."""
    difference = np.abs(np.asarray(image, dtype=np.int64) - np.asarray(base, dtype=np.int64))
    rows, cols = np.nonzero(difference.reshape(*np.shape(image)[:2], -1).sum(axis=-1) > threshold)
    if len(rows) == 0:
        return None, 0
    return (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())), len(rows)


def save_png(rgb: np.ndarray, path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path)
    return path
