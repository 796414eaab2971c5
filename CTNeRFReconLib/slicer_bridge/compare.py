"""A reconstruction against a reference CT in the scene: scores, a metrics table, a difference volume.

The reference node (any scalar volume: a CT loaded in Slicer, in HU or 1/mm) is brought to
attenuation, resampled by world coordinates onto the reconstruction's grid (so a misplaced
volume loses score instead of hiding the mistake), and scored with CTNeRFReconLib.metrics when
it is present (PSNR3D, SSIM3D, structure scores), else with PSNR3D / SSIM3D computed here under the
same convention as the benchmark referee (data range = reference maximum). The difference volume
is ``reconstruction - reference`` in 1/mm on the reconstruction grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..data import Volume
from ..phantom import MU_WATER
from ..reference import looks_like_hu
from ..volume_io import resample_to_grid
from . import volume_nodes as vn
from .tables import write_key_value_table

DIFFERENCE_COLOR_IDS = ("vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
                        "vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
"""Diverging colour tables of a Slicer scene, used for the difference when the scene has them."""


@dataclass
class Comparison:
    """Scores of a reconstruction against a reference resampled onto its grid."""

    metrics: dict
    reference_on_grid: Volume
    difference: Volume


def _own_scores(reference: Volume, volume: Volume) -> dict:
    ref = reference.array.astype(np.float64)
    rec = volume.array.astype(np.float64)
    data_range = float(ref.max())
    mse = float(np.mean((rec - ref) ** 2))
    out = {"psnr": math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse) if data_range > 0 else math.nan,
           "nrmse": math.sqrt(mse) / math.sqrt(float(np.mean(ref ** 2))) if np.any(ref) else math.nan}
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return out
    if min(ref.shape) >= 7 and data_range > 0:
        out["ssim"] = float(structural_similarity(ref, rec, data_range=data_range))
    return out


def score(reference_on_grid: Volume, volume: Volume) -> dict:
    """Scores through CTNeRFReconLib.metrics (as the worker computes them) or the fallback here."""
    try:
        from .. import metrics
    except ImportError:
        return _own_scores(reference_on_grid, volume)
    result = dict(metrics.score_volumes(reference_on_grid, volume))
    structure = getattr(metrics, "structure_scores", None)
    if structure is not None:
        result["structures"] = structure(reference_on_grid, volume)
    return result


def compare_volumes(reference: Volume, reconstruction: Volume) -> Comparison:
    """Resample the reference onto the reconstruction grid, score, and take the difference."""
    ref = resample_to_grid(reference, reconstruction.grid)
    diff = Volume((reconstruction.array.astype(np.float32) - ref.array).astype(np.float32), reconstruction.grid)
    return Comparison(score(ref, reconstruction), ref, diff)


def reference_volume_from_node(node, units: str = "auto", mu_water: float = MU_WATER) -> Volume:
    """A reference node as attenuation (1/mm) in the scanner frame.

    ``units``: 'mu', 'hu', or 'auto' (the bridge's own attribute when the node has one, else HU
    when the values look like HU, as CTNeRFReconLib.reference decides for files).
    """
    if units not in ("auto", "mu", "hu"):
        raise ValueError(f"reference units '{units}' unknown; use auto, mu (1/mm) or hu")
    if units == "auto":
        if node.GetAttribute(vn.ATTR_UNITS):
            return vn.volume_from_node(node)
        units = "hu" if looks_like_hu(vn.array_from_node(node)) else "mu"
    volume = vn.volume_from_node(node, units=units, mu_water=mu_water)
    return Volume(np.clip(volume.array, 0.0, None), volume.grid) if units == "hu" else volume


def flatten_metrics(metrics: dict, prefix: str = "") -> list[tuple[str, float]]:
    """Nested metric dicts as (dotted name, number) rows; non-numbers are left out."""
    rows = []
    for key, value in (metrics or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flatten_metrics(value, name + ".")
        elif isinstance(value, (bool, np.bool_)):
            rows.append((name, float(value)))
        elif isinstance(value, (int, float, np.integer, np.floating)) or value is None:
            rows.append((name, math.nan if value is None else float(value)))
    return rows


def show_difference(node):
    """Symmetric window about zero and a diverging colour table when the scene has one."""
    array = vn.array_from_node(node)
    half = float(np.percentile(np.abs(array), 99.5)) or 1e-3
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(-half, half)
    scene = node.GetScene()
    for color_id in DIFFERENCE_COLOR_IDS:
        if scene is not None and scene.GetNodeByID(color_id) is not None:
            display.SetAndObserveColorNodeID(color_id)
            break


def compare_nodes(scene, reference_node, reconstruction_node, reference_units: str = "auto",
                  mu_water: float = MU_WATER, difference_node=None, table_node=None,
                  name: str | None = None) -> tuple[Comparison, object, object]:
    """Score a reconstruction node against a reference node; fill (or create) the difference volume
    node and the metrics table node. Returns (comparison, difference node, table node)."""
    if reference_node is None or reference_node.GetImageData() is None:
        raise ValueError("no reference volume is selected (or it has no voxels); choose a loaded CT volume")
    if reconstruction_node is None or reconstruction_node.GetImageData() is None:
        raise ValueError("there is no reconstruction to compare yet; run or load a reconstruction first")
    name = name or reconstruction_node.GetName()
    result = compare_node_volumes(reference_node, reconstruction_node, reference_units, mu_water)
    difference_node = difference_into_node(scene, result, f"{name} difference", difference_node)
    rows = [("reference", reference_node.GetName())] + flatten_metrics(result.metrics)
    table_node = write_key_value_table(scene, rows, table_node, f"{name} metrics")
    return result, difference_node, table_node


def compare_node_volumes(reference_node, reconstruction_node, reference_units: str = "auto",
                         mu_water: float = MU_WATER) -> Comparison:
    """:func:`compare_volumes` of two volume nodes (the reconstruction node in its recorded units)."""
    return compare_volumes(reference_volume_from_node(reference_node, reference_units, mu_water),
                           vn.volume_from_node(reconstruction_node))


def difference_into_node(scene, comparison: Comparison, name: str, node=None):
    """The comparison's difference (1/mm) in a volume node, created when ``node`` is None."""
    if node is None:
        node = vn.create_volume_node(scene, comparison.difference, name)
    else:
        vn.update_volume_node(node, comparison.difference)
    node.SetAttribute("CTNeRFRecon.Role", "difference")
    show_difference(node)
    return node
