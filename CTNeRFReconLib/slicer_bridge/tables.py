"""MRML table and plot nodes for a run: the metrics table and the growing loss curve."""
from __future__ import annotations

import math

from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkStringArray

LOSS_COLUMNS = ("iteration", "loss", "projection_psnr", "elapsed_s")
"""Columns of the loss table (progress event fields)."""


def _new_table_node(scene, name: str):
    return scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))


def write_key_value_table(scene, rows, node=None, name: str = "metrics"):
    """Replace a table node's content by two columns, 'metric' (text) and 'value' (text: numbers keep
    their full precision, other values their text). Creates the node when ``node`` is None."""
    node = node or _new_table_node(scene, name)
    table = node.GetTable()
    was_modifying = node.StartModify()
    try:
        table.Initialize()
        keys, values = vtkStringArray(), vtkStringArray()
        keys.SetName("metric")
        values.SetName("value")
        for key, value in rows:
            keys.InsertNextValue(str(key))
            values.InsertNextValue(format_value(value))
        table.AddColumn(keys)
        table.AddColumn(values)
        table.Modified()
        node.Modified()
    finally:
        node.EndModify(was_modifying)
    return node


def format_value(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def read_key_value_table(node) -> dict[str, str]:
    table = node.GetTable()
    keys, values = table.GetColumnByName("metric"), table.GetColumnByName("value")
    return {keys.GetValue(i): values.GetValue(i) for i in range(table.GetNumberOfRows())}


def create_loss_table(scene, name: str):
    """An empty table node with the loss columns (numbers)."""
    node = _new_table_node(scene, name)
    table = node.GetTable()
    for column in LOSS_COLUMNS:
        array = vtkDoubleArray()
        array.SetName(column)
        table.AddColumn(array)
    return node


def append_loss_row(node, fields: dict):
    """Append one progress event's numbers (missing ones as NaN) to the loss table."""
    table = node.GetTable()
    for column in LOSS_COLUMNS:
        value = fields.get(column)
        table.GetColumnByName(column).InsertNextValue(math.nan if value is None else float(value))
    table.Modified()
    node.Modified()


def table_column(node, column: str) -> list[float]:
    array = node.GetTable().GetColumnByName(column)
    return [array.GetValue(i) for i in range(array.GetNumberOfTuples())]


def _line_chart(scene, table_node, name: str, what: str, columns: tuple[str, str], titles: tuple[str, str, str],
                markers: bool = False, log_y: bool = False):
    """(chart node, series node): one series of the table's `columns` (x, y), titled (chart, x axis, y axis)."""
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{name} {what}"))
    series.SetAndObserveTableNodeID(table_node.GetID())
    series.SetXColumnName(columns[0])
    series.SetYColumnName(columns[1])
    series.SetPlotType(series.PlotTypeScatter)
    series.SetMarkerStyle(series.MarkerStyleCircle if markers else series.MarkerStyleNone)
    series.SetLineWidth(1 if markers else 2)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{name} {what} chart"))
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(f"{name}: {titles[0]}")
    chart.SetXAxisTitle(titles[1])
    chart.SetYAxisTitle(titles[2])
    chart.SetYAxisLogScale(log_y)
    chart.SetLegendVisibility(False)
    return chart, series


def create_loss_chart(scene, table_node, name: str):
    """A plot chart node showing loss against iteration (log scale) from the loss table.

    Returns (chart node, series node). Slicer shows it with
    ``slicer.modules.plots.logic().ShowChartInLayout(chart)``.
    """
    return _line_chart(scene, table_node, name, "loss", ("iteration", "loss"),
                       ("training loss", "iteration", "loss (projection MSE)"), log_y=True)


def create_residual_chart(scene, table_node, name: str):
    """A plot chart node showing the residual per view against the view angle, from a residuals table
    (field_tools.residual_table_node): a bad frame or a view under the wrong angle is a spike. Returns
    (chart node, series node)."""
    return _line_chart(scene, table_node, name, "residual per view", ("angle_deg", "rmse"),
                       ("residual per view", "view angle (deg)", "RMSE of the line integrals"), markers=True)
