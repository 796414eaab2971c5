"""Which volumes the slice views show: the reconstruction under an overlay, linked, with an opacity.

Slice views take their layers from the scene's slice composite nodes (one per slice view: red,
yellow, green...). Comparing puts the reconstruction in the background of every view and the
reference (or the difference volume) in the foreground, with one foreground opacity, and turns
on the composite nodes' linked control so that moving the opacity or the layers in one view moves
them in all. Flicking between the two is moving that opacity between 0 (reconstruction only) and 1
(overlay only). Only MRML nodes are touched, so this works on any scene; in Slicer the views follow.
"""
from __future__ import annotations

COMPOSITE_CLASS = "vtkMRMLSliceCompositeNode"


def slice_composite_nodes(scene) -> list:
    """Every slice composite node of the scene (one per slice view)."""
    return [scene.GetNthNodeByClass(i, COMPOSITE_CLASS) for i in range(scene.GetNumberOfNodesByClass(COMPOSITE_CLASS))]


def _check_opacity(opacity: float) -> float:
    opacity = float(opacity)
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"overlay opacity {opacity} is outside 0..1; 0 shows the reconstruction only, 1 the "
                         "overlay only")
    return opacity


def show_layers(scene, background, foreground=None, opacity: float = 0.5, link: bool = True) -> int:
    """Show ``background`` under ``foreground`` (None: no overlay) at ``opacity`` in every slice view.

    With ``link`` the composite nodes' linked control is turned on, so the views move together.
    Returns how many views were set (0 when the scene has no slice views, e.g. outside Slicer).
    """
    opacity = _check_opacity(opacity)
    if background is None:
        raise ValueError("there is no reconstruction to show yet; run or choose an output volume first")
    composites = slice_composite_nodes(scene)
    for composite in composites:
        was_modifying = composite.StartModify()
        try:
            composite.SetBackgroundVolumeID(background.GetID())
            composite.SetForegroundVolumeID(None if foreground is None else foreground.GetID())
            composite.SetForegroundOpacity(opacity)
            if link:
                composite.SetLinkedControl(True)
        finally:
            composite.EndModify(was_modifying)
    return len(composites)


def set_overlay_opacity(scene, opacity: float) -> int:
    """Set the foreground opacity of every slice view (the flick control); returns the views set."""
    opacity = _check_opacity(opacity)
    composites = slice_composite_nodes(scene)
    for composite in composites:
        composite.SetForegroundOpacity(opacity)
    return len(composites)


def flicked(opacity: float) -> float:
    """The other end of a flick: 1 (overlay) from an opacity below one half, else 0 (reconstruction)."""
    return 1.0 if _check_opacity(opacity) < 0.5 else 0.0
