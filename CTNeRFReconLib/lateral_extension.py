"""The training grid goes on past the field of view where the object is wider than it.

An object wider than the region every view sees (a patient on a C-arm, a chest on a small flat panel,
a table or an arm beside the body) puts material outside that region into every ray: the rays at the
detector's column edges cross nothing else, and every other ray crosses it on its way in and out. A
volume that stops at the field of view's box has to explain that material with voxels inside, as a
bright rim near the box's sides and a wrong level across it (the truncation artefact of interior CT).
Training on a grid that goes on past the sides gives that material voxels of its own: the views that
see them (a point outside the field of view is on the detector in some views) place it, the TV prior
keeps it smooth, and the output grid stays the field of view's box.

How far: as far as the object goes past the field of view, estimated from the rays at the cut column
edges. Such a ray passes the rotation axis at the field of view's radius r and crosses only the part
of the object outside it; for a disc of radius R centred on the axis its line integral is
sqrt(1 - (r / R)^2) times that of the thickest ray in its row, so R follows from the ratio without
knowing the attenuation. `object_radius` takes, per view and cut side, the 90th percentile over the
rows of that R (the widest cross-section), and the median over the views and sides (a bone in the
thickest ray or a table at the edge moves single views a long way). The distance R - r is capped at
`MAX_FRACTION` of the box's larger in-plane half-side (the cost where the estimate runs away), and
under one training voxel nothing is widened. Carving (support.py) then removes what some view shows
in air. Measured at `--time-limit 180` (docs/nerf.md, "Wider than the field of view"):

* the 40-view abdomen at 2.4 mm cut to 120 of its 200 columns (the body reaches 19 mm past the field
  of view): the estimate is 19 mm, 38.87 dB inside the box against 29.37 unwidened, the RMS error in
  the ring inside the field of view's edge 1.0e-3 /mm against 5.1e-3; a fixed 32 mm gave 38.51;
* cut to 90 columns (50 mm past): the estimate is 69 mm, 35.26 against 14.57; a fixed 24 mm gave
  31.84, a fixed 48 mm 35.78;
* the 40-view 160 px case, whose body's corners just leave the field of view: the estimate is 1 mm and
  nothing is widened; a floor of 25 mm doubled the training grid (the carving keeps most of what
  lies outside, seen through the body by every view that sees it) and cost 0.7 dB in the time.

Only where the detector's rows run along one of the grid's axes (axial_extension.detector_axis), as in
every circular scanner frame this library reads; otherwise nothing is widened.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .geometry import ConeBeamGeometry, VolumeGrid

MAX_FRACTION = 0.75
"""The most distance past the sides, as a fraction of the box's larger in-plane half-side (the grown
box then has up to 6.25 times the voxels in-plane, before carving)."""
RATIO_CAP = 0.95
"""Edge-to-thickest ratios above this are taken as this (R at most 3.2 r)."""


@dataclass(frozen=True)
class LateralExtension:
    """Whole training voxels added at both ends of the two in-plane world axes."""

    axes: tuple[int, int]
    """The world axes (0 x, 1 y, 2 z) across the rotation axis."""
    voxels: int
    """Voxels added at each end of each of them."""
    mm: float
    """The distance asked for (mm) before rounding up to whole voxels."""
    edges: tuple[str, ...]
    """The detector's column edges ("columns-", "columns+") that see object."""

    def summary(self) -> dict:
        return {"axes": "".join("xyz"[a] for a in self.axes), "voxels": self.voxels, "mm": round(self.mm, 2),
                "edges": list(self.edges)}

    def grown(self, grid: VolumeGrid) -> VolumeGrid:
        """`grid` (axis-aligned) with the extension's voxels added at both ends of its in-plane axes."""
        shape, origin = list(grid.shape_xyz), list(grid.origin_xyz)
        for axis in self.axes:
            shape[axis] += 2 * self.voxels
            origin[axis] -= self.voxels * grid.spacing_xyz[axis]
        return VolumeGrid(tuple(shape), grid.spacing_xyz, tuple(origin))


def plan_lateral(geometry: ConeBeamGeometry, edges_cut: list[str], grid: VolumeGrid, projections: np.ndarray | None,
                 threshold: float, fraction: float = 0.0) -> LateralExtension | None:
    """The extension of `grid` (axis-aligned, the box the support is carved on) for a scan whose
    projections are cut at `edges_cut` (support.detector_edges_cut's names, with the carving
    `threshold`): R - r from `object_radius`, capped; `fraction` > 0 asks for that fraction of the
    box's larger in-plane half-side instead. None when no column edge is cut, the distance is under one
    voxel, the grid is not axis-aligned or the rows run along no grid axis."""
    from .axial_extension import detector_axis

    columns_cut = tuple(e for e in ("columns-", "columns+") if e in edges_cut)
    if not columns_cut or not grid.is_axis_aligned:
        return None
    found = detector_axis(geometry)
    if found is None:
        return None
    axes = tuple(a for a in range(3) if a != found[0])
    lo, hi = grid.bounds()
    half_side = float(max(hi[a] - lo[a] for a in axes)) / 2.0
    if fraction > 0:
        mm = fraction * half_side
    else:
        centre = (np.asarray(lo) + np.asarray(hi)) / 2.0
        estimate = object_radius(projections, geometry, threshold, axes, centre)
        reach = 0.0 if estimate is None else estimate[0] - estimate[1]
        mm = float(min(reach, MAX_FRACTION * half_side))
    h = float(max(grid.spacing_xyz[a] for a in axes))
    if mm < h:  # a sliver at most: its rim is a voxel wide, and a wider grid costs more than it gives
        return None
    voxels = int(math.ceil(mm / h - 1e-9))
    return LateralExtension(axes, voxels, mm, columns_cut)


def _edge_ray_radius(geometry: ConeBeamGeometry, view: int, column: int, axes, centre) -> float:
    """In-plane distance from the rotation axis (through `centre`) to the ray through the middle of
    `column` (at the detector's middle row)."""
    n_cols = geometry.det_shape[1]
    offset = (column - (n_cols - 1) / 2.0) * geometry.pixel_pitch[1]
    target = geometry.det_centers[view] + offset * geometry.det_u[view]
    if geometry.parallel:
        direction = (geometry.det_centers[view] - geometry.sources[view])[list(axes)]
        start = (target - centre)[list(axes)]
    else:
        direction = (target - geometry.sources[view])[list(axes)]
        start = (geometry.sources[view] - centre)[list(axes)]
    return float(abs(start[0] * direction[1] - start[1] * direction[0]) / max(np.linalg.norm(direction), 1e-12))


def object_radius(projections: np.ndarray, geometry: ConeBeamGeometry, threshold: float, axes, centre,
                  max_views: int = 64) -> tuple[float, float] | None:
    """(R, r): the object's in-plane radius estimated from the cut column edges (the module's
    docstring says how), and the mean radius r of the edge rays; None when no edge pixel sees object.
    Reads one view at a time (a large scan is never copied whole), at most `max_views` of them."""
    from .support import _box3

    n_views, _, n_cols = projections.shape
    picked = np.unique(np.linspace(0, n_views - 1, min(max_views, n_views)).round().astype(int))
    per_side, radii = [], []
    for view in picked:
        image = np.asarray(projections[view], dtype=np.float32)
        thickest = image.max(axis=1)
        for column in (0, n_cols - 1):
            edge = _box3(image[None, :, max(0, column - 1):column + 2])[0, :, 0 if column == 0 else -1]
            seen = (edge > threshold) & (thickest > 0)
            if np.count_nonzero(seen) < 3:
                continue
            r = _edge_ray_radius(geometry, int(view), column, axes, centre)
            ratio = np.clip(edge[seen] / thickest[seen], 0.0, RATIO_CAP)
            per_side.append(float(np.percentile(r / np.sqrt(1.0 - ratio ** 2), 90)))
            radii.append(r)
    if not per_side:
        return None
    return float(np.median(per_side)), float(np.mean(radii))


def inner_voxel_count(grid: VolumeGrid, box_lo, box_hi) -> int:
    """Voxels of `grid` (axis-aligned) whose centres lie in the box (lo, hi): the training voxels inside
    the output box, which the data-derived TV weight counts (what lies past the box is only seen by some
    views or some rows, and would raise the weight of the whole volume by its share)."""
    count = 1
    for a in range(3):
        centres = grid.origin_xyz[a] + grid.spacing_xyz[a] * np.arange(grid.shape_xyz[a])
        count *= int(np.count_nonzero((centres >= box_lo[a] - 1e-6) & (centres <= box_hi[a] + 1e-6)))
    return count
