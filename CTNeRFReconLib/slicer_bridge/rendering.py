"""Volume rendering of a reconstruction: transfer functions for attenuation values (MRML and VTK only).

Slicer's volume rendering presets are written for CT in Hounsfield units (air at -1000, soft tissue
near 0, bone above 300), so on a volume of linear attenuation (1/mm: air 0, water 0.02) they show
nothing or a solid block. Following the slice window/level (the volume rendering display node's
FollowVolumeDisplayNode) maps the window to an opaque ramp, which shows the outer surface, noise in
the air included. :func:`show_attenuation_rendering` instead gives the volume rendering its own
transfer functions from the node's window (robust percentiles of the data, or a CT preset, in the
node's own units): transparent up to a threshold part-way up the window (by default 45 %, above the
air, its noise and the weakest tissue), then a translucent ramp to the top of the window, grey to
white, so the inside of an object stays visible through its surface. They are rebuilt when the
node's window changes, so the rendering still follows the slice window/level.

Every function takes what it works on as arguments (the volume rendering logic is
``slicer.modules.volumerendering.logic()`` in Slicer); nothing here imports Qt or ``slicer.app``.
"""
from __future__ import annotations

from dataclasses import dataclass

DARK = (0.35, 0.30, 0.28)
"""Colour at the threshold (a warm dark grey)."""
BRIGHT = (1.0, 0.97, 0.92)
"""Colour at the top of the window."""


@dataclass(frozen=True)
class AttenuationTransfer:
    """Scalar (node unit) points of the transfer functions built from a window [low, high]."""

    threshold: float
    """Below this nothing is drawn (air and its noise)."""
    top: float
    """The top of the window: the most opaque, brightest value."""
    max_opacity: float
    """Opacity per voxel-sized step at ``top`` and above."""


def transfer_from_window(low: float, high: float, threshold_fraction: float = 0.45,
                         max_opacity: float = 0.15) -> AttenuationTransfer:
    """Transfer points of a display window: a threshold ``threshold_fraction`` of the window above its
    bottom (leaving out the air, its noise and the weakest tissue), full opacity ``max_opacity`` at its top."""
    low, high = float(low), float(high)
    if not high > low:
        raise ValueError(f"display window {low}..{high} is empty; set a window/level with a positive width first")
    if not 0.0 <= threshold_fraction < 1.0:
        raise ValueError(f"threshold fraction {threshold_fraction} is outside 0..1 (a fraction of the window)")
    if not 0.0 < max_opacity <= 1.0:
        raise ValueError(f"maximum opacity {max_opacity} is outside (0, 1]")
    return AttenuationTransfer(low + threshold_fraction * (high - low), high, max_opacity)


def fill_volume_property(volume_property, transfer: AttenuationTransfer, scalar_range, unit_distance: float):
    """Write the transfer functions into a ``vtkVolumeProperty`` (colour, scalar opacity, no gradient
    opacity); ``scalar_range`` (min, max) of the data bounds the functions, ``unit_distance`` (mm,
    about one voxel) is the length over which ``max_opacity`` applies."""
    lo = min(float(scalar_range[0]), transfer.threshold) - 1e-6
    hi = max(float(scalar_range[1]), transfer.top) + 1e-6
    colors = volume_property.GetRGBTransferFunction()
    colors.RemoveAllPoints()
    colors.AddRGBPoint(lo, *DARK)
    colors.AddRGBPoint(transfer.threshold, *DARK)
    colors.AddRGBPoint(transfer.top, *BRIGHT)
    colors.AddRGBPoint(hi, *BRIGHT)
    opacity = volume_property.GetScalarOpacity()
    opacity.RemoveAllPoints()
    opacity.AddPoint(lo, 0.0)
    opacity.AddPoint(transfer.threshold, 0.0)
    opacity.AddPoint(transfer.top, transfer.max_opacity)
    opacity.AddPoint(hi, transfer.max_opacity)
    gradient = volume_property.GetGradientOpacity()
    gradient.RemoveAllPoints()
    gradient.AddPoint(0.0, 1.0)
    gradient.AddPoint(max(abs(hi), abs(lo), 1.0), 1.0)
    volume_property.SetScalarOpacityUnitDistance(float(unit_distance))
    volume_property.SetInterpolationTypeToLinear()
    volume_property.ShadeOn()
    volume_property.SetAmbient(0.5)
    volume_property.SetDiffuse(0.6)
    volume_property.SetSpecular(0.1)
    volume_property.SetSpecularPower(10.0)
    volume_property.Modified()


def _scalar_range(volume_node):
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume node '{volume_node.GetName()}' has no voxels; load or reconstruct a volume first")
    return image.GetScalarRange()


def _display_window(volume_node):
    display = volume_node.GetDisplayNode()
    if display is None:
        raise ValueError(f"volume node '{volume_node.GetName()}' has no display node; show it in a slice view first")
    return display.GetWindowLevelMin(), display.GetWindowLevelMax()


def volume_rendering_display(volume_rendering_logic, volume_node, create: bool = True):
    """The volume's first volume rendering display node; made with Slicer's default nodes when it has
    none and ``create`` (else None). One get-or-create for the module and the rendered tests."""
    display = volume_rendering_logic.GetFirstVolumeRenderingDisplayNode(volume_node)
    if display is None and create:
        display = volume_rendering_logic.CreateDefaultVolumeRenderingNodes(volume_node)
    return display


def show_attenuation_rendering(volume_rendering_logic, volume_node, show: bool = True, window=None,
                               threshold_fraction: float = 0.45, max_opacity: float = 0.15,
                               follow_window: bool = True):
    """Volume render ``volume_node`` in every 3D view with transfer functions for its attenuation values.

    ``window``: (low, high) in the node's units; None takes the node's display window (the bridge's
    auto window, or a CT preset set with ``volume_nodes.set_window``), and with ``follow_window`` the
    transfer functions are rebuilt whenever that window changes (an observer on the node's display
    node), so the rendering follows the slice window/level as Slicer's own following does. The volume
    rendering display node's own FollowVolumeDisplayNode is turned off (it would overwrite these
    functions with an opaque ramp). ``show=False`` hides an existing rendering (and creates none).
    Returns the volume rendering display node (None when hiding a volume that has none).
    """
    display = volume_rendering_display(volume_rendering_logic, volume_node, create=show)
    if display is None:
        return None
    if show:
        display.SetFollowVolumeDisplayNode(False)
        settings = (threshold_fraction, max_opacity)
        _apply(display, volume_node, window, settings)
        _unfollow(display)
        if window is None and follow_window:
            _follow(display, volume_node, settings)
    display.SetVisibility(bool(show))
    return display


def _apply(display, volume_node, window, settings):
    low, high = window if window is not None else _display_window(volume_node)
    transfer = transfer_from_window(low, high, *settings)
    spacing = volume_node.GetSpacing()
    fill_volume_property(display.GetVolumePropertyNode().GetVolumeProperty(), transfer,
                         _scalar_range(volume_node), sum(spacing) / 3.0)
    display.GetVolumePropertyNode().Modified()
    return low, high


_FOLLOWERS: dict[str, tuple] = {}
"""Volume rendering display node (its address) -> (scalar display node, observer tag). The observer holds
the nodes, so an address is not reused while it is here; a node that left its scene is dropped at the
next window change."""


def _key(display) -> str:
    return display.GetAddressAsString("vtkObject")


def _follow(display, volume_node, settings):
    scalar_display = volume_node.GetDisplayNode()
    applied = [_display_window(volume_node)]

    def on_modified(caller, event):
        if display.GetScene() is None or volume_node.GetScene() is None:
            _unfollow(display)
            return
        if display.GetFollowVolumeDisplayNode():  # someone chose Slicer's own following instead
            return
        current = _display_window(volume_node)
        if current != applied[0] and current[1] > current[0]:
            applied[0] = _apply(display, volume_node, None, settings)

    tag = scalar_display.AddObserver("ModifiedEvent", on_modified)
    _FOLLOWERS[_key(display)] = (scalar_display, tag)


def _unfollow(display):
    scalar_display, tag = _FOLLOWERS.pop(_key(display), (None, None))
    if scalar_display is not None:
        scalar_display.RemoveObserver(tag)
