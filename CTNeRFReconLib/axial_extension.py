"""The training grid goes on past the ends where the detector cuts the object along the rotation axis.

An object longer than the detector along the axis (every body scan) puts the material just beyond
the grid's ends into the line integrals of the rows near the detector's top and bottom edges: a
cone-beam ray to an edge row climbs along the axis while it crosses the object. A volume that stops
at the grid's end faces has to explain that material with voxels inside, as a bright rim and a dark
band near each face (the long-object problem of cone-beam CT). Training on a grid that goes on past
each cut end gives that material voxels of its own; the output grid stays what it was.

How far: a ray to the edge row at slope t (along the axis, per mm across it) that enters the object
at radius R has climbed R t by the time it reaches the axis. `plan_extension` extends each cut end by
R t, with R half the larger in-plane side of the support's box and t the steepest edge-row ray over
the views. Why not plain TV near the faces instead: a band of plain TV only moved the rim inwards,
while a grid 18 mm longer at each end took the error in the outer fifth of the axis from 3.5e-3 to
1.3e-3 /mm RMS on the 40-view abdomen cut to 90 of 200 rows (R t there: 16 mm; docs/nerf.md, "Cut
along the axis").

Only where the detector's rows run along one of the grid's axes (within 10 degrees in every view),
as in every circular scanner frame this library reads; otherwise nothing is extended.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .geometry import ConeBeamGeometry, VolumeGrid

AXIS_TOLERANCE_DEG = 10.0


@dataclass(frozen=True)
class AxialExtension:
    """Whole training voxels added below and above the support's grid along one world axis."""

    axis: int
    """World axis (0 x, 1 y, 2 z) the detector's rows run along."""
    voxels_low: int
    voxels_high: int
    mm_low: float
    """R t at the low end (mm), before rounding up to whole voxels."""
    mm_high: float
    edges: tuple[str, ...]
    """The detector's row edges ("rows-", "rows+") whose ends were extended."""

    def summary(self) -> dict:
        return {"axis": "xyz"[self.axis], "voxels": [self.voxels_low, self.voxels_high],
                "mm": [round(self.mm_low, 2), round(self.mm_high, 2)], "edges": list(self.edges)}

    def grown(self, grid: VolumeGrid) -> VolumeGrid:
        """`grid` (axis-aligned) with the extension's voxels added at the two ends of its axis."""
        shape = list(grid.shape_xyz)
        shape[self.axis] += self.voxels_low + self.voxels_high
        origin = list(grid.origin_xyz)
        origin[self.axis] -= self.voxels_low * grid.spacing_xyz[self.axis]
        return VolumeGrid(tuple(shape), grid.spacing_xyz, tuple(origin))


def detector_axis(geometry: ConeBeamGeometry) -> tuple[int, float] | None:
    """(world axis, +1 or -1): the axis the detector's rows run along (its v direction) and whether v
    points up or down it; None when no world axis is within AXIS_TOLERANCE_DEG of v in every view."""
    v = np.asarray(geometry.det_v, dtype=np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    axis = int(np.argmax(np.abs(v.mean(axis=0))))
    cos = v[:, axis]
    sign = 1.0 if cos.mean() > 0 else -1.0
    if float(np.min(sign * cos)) < math.cos(math.radians(AXIS_TOLERANCE_DEG)):
        return None
    return axis, sign


def edge_row_slopes(geometry: ConeBeamGeometry, axis: int) -> tuple[float, float]:
    """(low, high): the steepest climb along world `axis`, per mm across it, of the rays from the source
    to the outer edge of the detector's first and last row (at the detector's middle column), towards
    the axis's low and high end (0 where none climbs that way: a detector shifted along the axis); 0 for
    parallel beams (their rays do not climb)."""
    if geometry.parallel:
        return 0.0, 0.0
    n_rows = geometry.det_shape[0]
    half = n_rows / 2.0 * geometry.pixel_pitch[0]
    low = high = 0.0
    for view in range(geometry.n_views):
        for offset in (-half, half):
            ray = geometry.det_centers[view] + offset * geometry.det_v[view] - geometry.sources[view]
            along = float(ray[axis])
            across = float(np.linalg.norm(np.delete(ray, axis)))
            if across <= 0:
                continue
            slope = along / across
            low, high = max(low, -slope), max(high, slope)
    return low, high


def plan_extension(geometry: ConeBeamGeometry, edges_cut: list[str], box_lo, box_hi, spacing_xyz,
                   faces_reached: list[str] | None = None) -> AxialExtension | None:
    """The extension for a scan whose projections are cut at `edges_cut` (support.detector_edges_cut's
    names), for the support's box (lo, hi in mm) tiled by voxels of `spacing_xyz`; None when no row edge
    is cut, the rows run along no grid axis, or the rays do not climb (parallel beam).

    With `faces_reached` (Support.faces_reached: "y-", "y+", ...) only the ends the support reaches are
    extended. An object that ends inside the grid can still show on an edge row, in the views where it
    lies close to the source and its image is magnified past the detector (the 30-slice slab at 160
    px); nothing of it lies past that end."""
    rows_cut = {name for name in edges_cut if name.startswith("rows")}
    if not rows_cut:
        return None
    found = detector_axis(geometry)
    if found is None:
        return None
    axis, sign = found
    lo_slope, hi_slope = edge_row_slopes(geometry, axis)
    extent = np.asarray(box_hi, dtype=np.float64) - np.asarray(box_lo, dtype=np.float64)
    radius = float(np.delete(extent, axis).max()) / 2.0
    # rows- lies at -v: the low end of the axis when v points up it, the high end when down
    low_edge, high_edge = ("rows-", "rows+") if sign > 0 else ("rows+", "rows-")
    name = "xyz"[axis]
    low_open = faces_reached is None or f"{name}-" in faces_reached
    high_open = faces_reached is None or f"{name}+" in faces_reached
    mm_low = radius * lo_slope if low_edge in rows_cut and low_open else 0.0
    mm_high = radius * hi_slope if high_edge in rows_cut and high_open else 0.0
    h = float(spacing_xyz[axis])
    n_low, n_high = int(math.ceil(mm_low / h - 1e-9)), int(math.ceil(mm_high / h - 1e-9))
    if n_low == 0 and n_high == 0:
        return None
    extended = {e for e, n in ((low_edge, n_low), (high_edge, n_high)) if n > 0}
    edges = tuple(e for e in ("rows-", "rows+") if e in extended)
    return AxialExtension(axis, n_low, n_high, mm_low, mm_high, edges)


def plan_for_scan(projections: np.ndarray, geometry: ConeBeamGeometry, threshold: float, box_lo, box_hi,
                  spacing_xyz, faces_reached: list[str] | None = None) -> AxialExtension | None:
    """`plan_extension` for a scan: the cut edges are the detector edges whose pixels see more than the
    carving `threshold` (support.detector_edges_cut)."""
    from .support import detector_edges_cut

    return plan_extension(geometry, detector_edges_cut(projections, threshold), box_lo, box_hi, spacing_xyz,
                          faces_reached)
