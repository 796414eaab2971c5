"""The module's two view layouts, registered on the scene's layout node (MRML only, no Qt).

* **Monitor** (:data:`MONITOR_LAYOUT_ID`): the 3D view and the loss chart on top, the Red, Yellow and
  Green slice views below, so a run shows its slices, its rendering and its curve at once. Slicer's
  ``ShowChartInLayout`` would switch Four-Up to "Four-Up Plot", which replaces the 3D view by the
  plot: a *Show in 3D* rendering would then go to a view that is not on screen.
* **Side by side** (:data:`SIDE_BY_SIDE_LAYOUT_ID`): three axial slice views in a row, the
  reconstruction, the reference and the difference, each with its own background volume and linked
  (one slice offset, zoom and pan for the three), above the usual three views of the reconstruction.

* **Monitor with table** (:data:`MONITOR_TABLE_LAYOUT_ID`): the monitor with a table view below, where
  *Show table* puts the comparison's scores. Slicer's ``GetLayoutWithTable`` maps every layout it does
  not know to "Four-Up Table", which has no plot view: from the monitor it would hide the loss chart.

Layouts are XML descriptions that the layout node keeps by id; in Slicer the layout manager makes
the views (slice nodes named by their ``singletontag``, with a slice composite node each) when the
arrangement is selected. Ids are plain integers above Slicer's own (which stay below 1000). A scene
saved in one of them keeps only the id (vtkMRMLLayoutNode writes ``currentViewArrangement``, not the
description), so the module registers them when Slicer starts, before any scene is loaded.
"""
from __future__ import annotations

from .views import slice_composite_nodes

MONITOR_LAYOUT_ID = 7301
SIDE_BY_SIDE_LAYOUT_ID = 7302
MONITOR_TABLE_LAYOUT_ID = 7303

SIDE_BY_SIDE_VIEWS = ("CTNeRFReconOutput", "CTNeRFReconReference", "CTNeRFReconDifference")
"""Layout names (singleton tags) of the side-by-side row: reconstruction | reference | difference."""

_SLICE_COLORS = {"Red": "#F34A33", "Yellow": "#EDD54C", "Green": "#6EB04B"}


def _slice_view(tag: str, orientation: str, label: str, color: str, group: int = 0) -> str:
    group_property = f'<property name="viewgroup" action="default">{group}</property>' if group else ""
    return (f'<item><view class="vtkMRMLSliceNode" singletontag="{tag}">'
            f'<property name="orientation" action="default">{orientation}</property>'
            f'<property name="viewlabel" action="default">{label}</property>'
            f'<property name="viewcolor" action="default">{color}</property>{group_property}'
            '</view></item>')


def _standard_slice_row() -> str:
    return ('<item><layout type="horizontal">'
            + _slice_view("Red", "Axial", "R", _SLICE_COLORS["Red"])
            + _slice_view("Yellow", "Sagittal", "Y", _SLICE_COLORS["Yellow"])
            + _slice_view("Green", "Coronal", "G", _SLICE_COLORS["Green"])
            + "</layout></item>")


_MONITOR_ROWS = (
    '<item><layout type="horizontal">'
    '<item><view class="vtkMRMLViewNode" singletontag="1">'
    '<property name="viewlabel" action="default">1</property></view></item>'
    '<item><view class="vtkMRMLPlotViewNode" singletontag="PlotView1">'
    '<property name="viewlabel" action="default">P</property></view></item>'
    '</layout></item>'
    + _standard_slice_row())

MONITOR_LAYOUT_XML = '<layout type="vertical">' + _MONITOR_ROWS + '</layout>'
"""3D view | loss chart over Red | Yellow | Green."""

MONITOR_TABLE_LAYOUT_XML = (
    '<layout type="vertical">' + _MONITOR_ROWS
    + '<item><view class="vtkMRMLTableViewNode" singletontag="TableView1">'
    '<property name="viewlabel" action="default">T</property></view></item>'
    '</layout>')
"""The monitor over a table view (Slicer's own table layouts name theirs TableView1 too)."""

SIDE_BY_SIDE_LAYOUT_XML = (
    '<layout type="vertical">'
    '<item><layout type="horizontal">'
    + _slice_view(SIDE_BY_SIDE_VIEWS[0], "Axial", "Recon", "#3070C0", group=1)
    + _slice_view(SIDE_BY_SIDE_VIEWS[1], "Axial", "Ref", "#30A0A0", group=1)
    + _slice_view(SIDE_BY_SIDE_VIEWS[2], "Axial", "Diff", "#A050A0", group=1)
    + '</layout></item>'
    + _standard_slice_row()
    + '</layout>')
"""Reconstruction | reference | difference (axial, linked) over Red | Yellow | Green."""


LAYOUTS = {MONITOR_LAYOUT_ID: MONITOR_LAYOUT_XML, SIDE_BY_SIDE_LAYOUT_ID: SIDE_BY_SIDE_LAYOUT_XML,
           MONITOR_TABLE_LAYOUT_ID: MONITOR_TABLE_LAYOUT_XML}
"""The module's layouts by id."""


def register_layouts(layout_node) -> None:
    """Add (or refresh) the module's layout descriptions on the scene's layout node."""
    for layout_id, xml in LAYOUTS.items():
        if layout_node.IsLayoutDescription(layout_id):
            layout_node.SetLayoutDescription(layout_id, xml)
        else:
            layout_node.AddLayoutDescription(layout_id, xml)


def layout_node_of(scene):
    """The scene's layout node (Slicer makes one; a bare scene gets one here)."""
    node = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    return node


def select_layout(scene, layout_id: int) -> None:
    """Register the module's layouts and switch the view arrangement to one of them."""
    layout_node = layout_node_of(scene)
    register_layouts(layout_node)
    layout_node.SetViewArrangement(int(layout_id))


def layout_with_table(current: int, slicer_choice) -> int:
    """The layout to switch to for showing a table from layout `current`: the monitor gets its table
    row (the chart stays on screen), a layout with a table keeps it, any other is Slicer's choice
    (`slicer_choice(current)`: vtkSlicerTablesLogic.GetLayoutWithTable)."""
    if current in (MONITOR_LAYOUT_ID, MONITOR_TABLE_LAYOUT_ID):
        return MONITOR_TABLE_LAYOUT_ID
    return int(slicer_choice(current))


def show_chart(scene, chart_node) -> int:
    """Show a plot chart in every plot view of the scene; returns how many views were set."""
    count = 0
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLPlotViewNode")):
        view = scene.GetNthNodeByClass(i, "vtkMRMLPlotViewNode")
        view.SetPlotChartNodeID(None if chart_node is None else chart_node.GetID())
        count += 1
    return count


def show_side_by_side(scene, output_node, reference_node, difference_node=None) -> int:
    """Each side-by-side view gets its own volume as background (no overlay), linked within the row.

    Returns how many of the three views exist (0 before the layout manager has made them).
    """
    if output_node is None or reference_node is None:
        raise ValueError("the side-by-side view needs a reconstruction and a reference; run or choose both first")
    backgrounds = dict(zip(SIDE_BY_SIDE_VIEWS, (output_node, reference_node, difference_node)))
    count = 0
    for composite in slice_composite_nodes(scene):
        volume = backgrounds.get(composite.GetLayoutName(), False)
        if volume is False:
            continue
        was_modifying = composite.StartModify()
        try:
            composite.SetBackgroundVolumeID(None if volume is None else volume.GetID())
            composite.SetForegroundVolumeID(None)
            composite.SetLabelVolumeID(None)
            composite.SetLinkedControl(True)
        finally:
            composite.EndModify(was_modifying)
        count += 1
    return count
