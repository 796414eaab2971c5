"""The training grid goes on past the field of view where the object is wider than it.

An object wider than the region every view sees (a patient on a C-arm, a chest on a small flat panel,
a table or an arm beside the body) puts material outside that region into every ray: the rays at the
detector's column edges cross nothing else, and every other ray crosses it on its way in and out. A
volume that stops at the field of view's box has to explain that material with voxels inside, as a
bright rim near the box's sides and a wrong level across it (the truncation artefact of interior CT).
Training on a grid that goes on past the sides gives that material voxels of its own: the views that
see them (a point outside the field of view is on the detector in some views) place it, the TV prior
keeps it smooth, and the output grid stays the field of view's box.

How far, face by face: as far as the object goes past each of the box's four in-plane faces,
estimated from the rays at the cut column edges. Such a ray passes the rotation axis at the field of
view's radius r, on the side of its foot (the point nearest the axis), and crosses only the part of the
object outside the field of view there; for a disc of radius R centred on the axis its line integral is
sqrt(1 - (r / R)^2) times that of the thickest ray in its row, so R follows from the ratio without
knowing the attenuation. `edge_rays` takes, per view and column edge, the 90th percentile over the
rows of that R (the widest cross-section), or r where the edge sees air (nothing goes past there).
Each face then takes the median R of the edge rays whose foot lies within 45 degrees of its outward
normal (a bone in the thickest ray or a table at the edge moves single views a long way) less the
face's distance from the axis. A body off the axis, or a table at one side, so gets its distance where
it goes past and none where it does not. Off the axis the disc model reads high on the far side, as
the rays facing it pass the body off its centre: a disc of radius 100 mm lying 20 mm off the axis of a
92 mm field of view reads 126 mm there against 120, and nothing on its near side; 30 mm off, 16 % high
(Testing/test_lateral_extension.py). Each distance is capped at `MAX_FRACTION` of the
box's larger in-plane half-side (the cost where the estimate runs away), and under one training voxel
that face is not widened. Carving (support.py) then removes what some view shows in air. Measured at
`--time-limit 180` (docs/nerf.md, "Wider than the field of view"):

* the 40-view abdomen at 2.4 mm cut to 120 of its 200 columns (the body reaches 19 mm past the field
  of view): the estimate is 19 mm, 38.87 dB inside the box against 29.37 unwidened, the RMS error in
  the ring inside the field of view's edge 1.0e-3 /mm against 5.1e-3; a fixed 32 mm gave 38.51;
* cut to 90 columns (50 mm past): the estimate is 69 mm, 35.26 against 14.57; a fixed 24 mm gave
  31.84, a fixed 48 mm 35.78;
* the 40-view 160 px case, whose body's corners just leave the field of view: the estimate is 1 mm and
  nothing is widened; a floor of 25 mm doubled the training grid (the carving keeps most of what
  lies outside, seen through the body by every view that sees it) and cost 0.7 dB in the time;
* the first case with the body 30 mm off the axis (49 mm past the field of view on one side, inside it
  on the other): 63 mm past that face, 4 mm and 22-26 mm past the others, 39.46 dB against 37.49 with
  one distance (the median) for every face and 26.48 unwidened. (The first two figures above were
  measured with one distance for every face; face by face they are 38.88 and 35.18.)

Something thin leaving the field of view (a table top under a patient, a holder's plate) puts too
little into the edge rays, next to the body's thickest ray, for the disc model to read anything going
on: its edge rays cross it through its thickness. Its mass does show: a parallel projection's row
integrates to the mass of its slice in every view, so what a view that cuts the object misses, against
the views that cut nothing, is the mass past its column edges, and that mass over the edge rays' line
integrals is how far the thin thing goes on past them (exact for a plate of even thickness, about 2/3
of the distance for a disc's cap, so a body that only just leaves the field of view reads a millimetre
or two). `thin_reach_past_faces` says how; `plan_lateral` uses it on the in-plane faces the object's
support reaches and the disc model leaves, with `measure_thin_sides` (on by default). On the patient
on a 470 mm table in a 341 mm field of view (benchmarks/make_table_ct.py) it reads 69 mm past x- and
x+ against the true 66.5 mm, and nothing past the sides the table does not leave by.

Only where the detector's rows run along one of the grid's axes (axial_extension.detector_axis), as in
every circular scanner frame this library reads; otherwise nothing is widened.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .data import evenly_spaced
from .geometry import ConeBeamGeometry, VolumeGrid

MAX_FRACTION = 0.75
"""The most distance past the sides, as a fraction of the box's larger in-plane half-side (the grown
box then has up to 6.25 times the voxels in-plane, before carving)."""
THIN_FRACTION = 0.4
"""The least distance past a side the object's support reaches while the edge rays facing it show no
body going on, with `widen_reached_sides` (`plan_lateral`): a fraction of the box's larger in-plane
half-side."""
RATIO_CAP = 0.95
"""Edge-to-thickest ratios above this are taken as this (R at most 3.2 r)."""
MAX_VIEWS = 64
"""The edge rays are read from at most this many views."""
WINDOW_DEGREES = 45.0
"""A face reads the edge rays whose foot lies within this angle of its outward normal (the four
windows tile the circle)."""
THIN_WINDOW_DEGREES = 15.0
"""`thin_reach_past_faces` reads, for a face, the edge rays within this angle of its outward normal (or
within 0.6 of the views' angular step, on a sparser scan): the rays that run along the face, past which
a plate's excess is its length past the face; a wider window mixes in oblique rays whose excess is
measured along the ray's own foot."""
MASS_ROWS = 32
"""`thin_reach_past_faces` sums the line integrals of at most this many rows around the detector's
middle row (the most nearly axial slices, little cone tilt), reading one view's band at a time."""


@dataclass(frozen=True)
class LateralExtension:
    """Whole training voxels added past the box's faces on the two in-plane world axes, face by face."""

    axes: tuple[int, int]
    """The world axes (0 x, 1 y, 2 z) across the rotation axis."""
    voxels: tuple[tuple[int, int], tuple[int, int]]
    """Voxels added past the low and the high face of each of `axes`."""
    mm: tuple[tuple[float, float], tuple[float, float]]
    """The distances asked for (mm) before rounding up to whole voxels, as `voxels`."""
    edges: tuple[str, ...]
    """The detector's column edges ("columns-", "columns+") that see object."""
    thin: tuple[str, ...] = ()
    """Faces ("x-", ...) widened for something thin (a table top) leaving the field of view: the support
    reaches them while the edge rays show no body going on past them, and the mass the views that cut
    the object miss says how far it goes (`thin_reach_past_faces`), or `THIN_FRACTION` where asked
    (`widen_reached_sides`)."""

    def faces(self) -> dict[str, tuple[float, int]]:
        """{face ("x-", ...): (mm, voxels)} of the faces trained past."""
        return {"xyz"[axis] + sign: (self.mm[i][k], self.voxels[i][k]) for i, axis in enumerate(self.axes)
                for k, sign in enumerate("-+") if self.voxels[i][k] > 0}

    def summary(self) -> dict:
        return {"axes": "".join("xyz"[a] for a in self.axes),
                "faces": {face: {"mm": round(mm, 2), "voxels": n} for face, (mm, n) in self.faces().items()},
                "edges": list(self.edges), "thin": list(self.thin)}

    def grown(self, grid: VolumeGrid) -> VolumeGrid:
        """`grid` (axis-aligned) with the extension's voxels added past its in-plane faces."""
        shape, origin = list(grid.shape_xyz), list(grid.origin_xyz)
        for (lo, hi), axis in zip(self.voxels, self.axes):
            shape[axis] += lo + hi
            origin[axis] -= lo * grid.spacing_xyz[axis]
        return VolumeGrid(tuple(shape), grid.spacing_xyz, tuple(origin))


def describe_faces(summary: dict) -> str:
    """"40 mm past x+, 7.5 mm past z- and z+": a widening's summary() in words, nearest faces together."""
    by_mm: dict[float, list[str]] = {}
    for face, past in summary["faces"].items():
        by_mm.setdefault(past["mm"], []).append(face)
    text = ", ".join(f"{mm:g} mm past {' and '.join(faces)}" for mm, faces in by_mm.items())
    thin = summary.get("thin") or []  # (not in the summaries of checkpoints written before 2026-12-06)
    if thin:
        text += (f" ({' and '.join(thin)}: reached by the object, where something thin such as a table top "
                 "goes on past the field of view)")
    return text


def truncating_edges(geometry: ConeBeamGeometry, edges_cut) -> tuple[str, ...]:
    """The detector edges among `edges_cut` (support.detector_edges_cut's names) that cut the object
    short: all of them but a displaced detector's near edge on a closed orbit (orbit.DisplacedDetector),
    whose rays pass near the axis, well inside the circle the orbit measures (fov.measured_geometry):
    the object past it is measured from the other side, and says nothing of what lies past the box."""
    from .orbit import displaced_detector

    displaced = displaced_detector(geometry)
    return tuple(e for e in edges_cut if displaced is None or e != displaced.near_edge)


def truncating_columns(geometry: ConeBeamGeometry, edges_cut) -> tuple[str, ...]:
    """The column edges among `edges_cut` that cut the object short (`truncating_edges`): what widens the
    grid past the sides (`plan_lateral`, `plan_for_scan`)."""
    return truncating_edges(geometry, [e for e in ("columns-", "columns+") if e in edges_cut])


def plan_for_scan(projections: np.ndarray, geometry: ConeBeamGeometry, threshold: float, grid: VolumeGrid,
                  fraction: float = 0.0, reached_sides: bool = False, support_settings=None,
                  stats: dict | None = None, measure_thin: bool = True,
                  faces_reached=None) -> LateralExtension | None:
    """`plan_lateral` for a scan: the detector's cut edges at the carving `threshold`
    (support.detector_edges_cut), then the plan. Where columns are cut and `measure_thin` (how far
    something thin goes on, `thin_reach_past_faces`) or `reached_sides` (`THIN_FRACTION` at least) asks
    for it and the edge rays leave an in-plane side as it is, the faces of `grid` the object's support
    reaches: `faces_reached` when the caller carved on `grid` already, otherwise carved here with
    `support_settings` and the projections' air `stats` (seconds on a large grid: 11 s on 316 x 320 x 315
    voxels from 50 views of 320 x 320 px). What the trainer, its memory check and `info` call."""
    from .support import SupportSettings, air_statistics, detector_edges_cut, object_support

    edges_cut = detector_edges_cut(projections, threshold)
    disc = _disc_reach(geometry, edges_cut, grid, projections, threshold, fraction)
    if disc is None or not (reached_sides or measure_thin) or fraction > 0 or np.all(disc.mm >= disc.voxel):
        return _plan(disc, fraction)  # nothing to ask, or the edge rays widen every side already
    if faces_reached is None:
        carved = object_support(projections, geometry, grid, support_settings or SupportSettings(), stats=stats)
        faces_reached = carved.faces_reached if carved.found else ()
    reached, thin_mm = tuple(faces_reached), None
    if measure_thin and reached:
        air = (stats if stats is not None else air_statistics(projections)).get("air_level", 0.0)
        thin_mm = thin_reach_past_faces(projections, geometry, float(air), threshold, disc.axes, disc.centre)
    return _plan(disc, fraction, reached, thin_mm, force_thin=reached_sides)


def plan_lateral(geometry: ConeBeamGeometry, edges_cut: list[str], grid: VolumeGrid, projections: np.ndarray | None,
                 threshold: float, fraction: float = 0.0, faces_reached=(), thin_mm: np.ndarray | None = None,
                 force_thin: bool = False) -> LateralExtension | None:
    """The extension of `grid` (axis-aligned, the box the support is carved on) for a scan whose
    projections are cut at `edges_cut` (support.detector_edges_cut's names, with the carving
    `threshold`): each face's distance from `reach_past_faces`, capped; `fraction` > 0 asks for that
    fraction of the box's larger in-plane half-side past every face instead. None when no column edge
    is cut, every distance is under one voxel, the grid is not axis-aligned or the rows run along no
    grid axis.

    A face in `faces_reached` (faces of `grid` the object's support reaches) that the edge rays leave
    under one voxel gets the distance `thin_mm` ((2, 2) as `reach_past_faces`, from
    `thin_reach_past_faces`) says something thin goes on past it, and with `force_thin` at least
    `THIN_FRACTION` of the half-side. A table top's edge rays cross it through its thickness, too little
    next to the body's thickest ray for the disc model to read anything going on; its mass shows how far
    it goes, where a body whose sides only just leave the field of view reads a millimetre or two and is
    left as it is (docs/nerf.md, "Reading a table from the data")."""
    return _plan(_disc_reach(geometry, edges_cut, grid, projections, threshold, fraction), fraction,
                 faces_reached, thin_mm, force_thin)


@dataclass(frozen=True)
class _DiscReach:
    """What the edge rays say of a grid's in-plane faces, before the thin faces (`plan_lateral`)."""

    columns_cut: tuple[str, ...]
    axes: tuple[int, int]
    centre: np.ndarray
    half_side: float
    voxel: float
    """The training voxel across the axes (mm): under it a face is not widened."""
    mm: np.ndarray
    """(2, 2) mm past the low and high face of each of `axes`, capped (or `fraction` of the half-side)."""


def _disc_reach(geometry: ConeBeamGeometry, edges_cut, grid: VolumeGrid, projections, threshold: float,
                fraction: float) -> _DiscReach | None:
    """The edge rays' distances past `grid`'s in-plane faces (`reach_past_faces`, capped), or `fraction`
    of the half-side; None when no column edge cuts the object, the grid is not axis-aligned or the rows
    run along no grid axis."""
    from .axial_extension import detector_axis

    columns_cut = truncating_columns(geometry, edges_cut)
    found = detector_axis(geometry)
    if not columns_cut or not grid.is_axis_aligned or found is None:
        return None
    axes = tuple(a for a in range(3) if a != found[0])
    lo, hi = grid.bounds()
    centre = (np.asarray(lo) + np.asarray(hi)) / 2.0
    half_side = float(max(hi[a] - lo[a] for a in axes)) / 2.0
    columns = {"columns-": 0, "columns+": geometry.det_shape[1] - 1}
    if fraction > 0:
        mm = np.full((2, 2), fraction * half_side)
    else:
        rays = edge_rays(projections, geometry, threshold, axes, centre, [columns[e] for e in columns_cut])
        mm = np.minimum(reach_past_faces(rays, axes, lo, hi, centre), MAX_FRACTION * half_side)
    return _DiscReach(columns_cut, axes, centre, half_side, float(max(grid.spacing_xyz[a] for a in axes)), mm)


def _plan(disc: _DiscReach | None, fraction: float, faces_reached=(), thin_mm: np.ndarray | None = None,
          force_thin: bool = False) -> LateralExtension | None:
    """`plan_lateral` from the edge rays' distances: the thin faces (its docstring), then whole voxels."""
    if disc is None:
        return None
    mm, h = disc.mm.copy(), disc.voxel
    thin = []
    if fraction <= 0:
        for i, axis in enumerate(disc.axes):
            for k, sign in enumerate("-+"):
                if "xyz"[axis] + sign not in faces_reached or mm[i, k] >= h:
                    continue
                past = min(float(thin_mm[i, k]) if thin_mm is not None else 0.0, MAX_FRACTION * disc.half_side)
                if force_thin:
                    past = max(past, THIN_FRACTION * disc.half_side)
                if past >= h:
                    mm[i, k] = past
                    thin.append("xyz"[axis] + sign)
    # a sliver at most is left alone: its rim is a voxel wide, and a wider grid costs more than it gives
    voxels = np.where(mm < h, 0, np.ceil(mm / h - 1e-9)).astype(int)
    if not voxels.any():
        return None
    return LateralExtension(disc.axes, tuple(tuple(int(n) for n in row) for row in voxels),
                            tuple(tuple(float(d) for d in row) for row in mm), disc.columns_cut, tuple(thin))


@dataclass(frozen=True)
class EdgeRays:
    """The column edges' rays of the views read, one entry per view and edge."""

    foot: np.ndarray
    """(n, 2) unit in-plane vectors from the rotation axis to the ray's nearest point (its foot)."""
    r: np.ndarray
    """(n,) the ray's distance from the axis (mm)."""
    radius: np.ndarray
    """(n,) the object's radius R the ray's line integrals give (mm); r where the edge sees air."""


def _edge_ray_ends(geometry: ConeBeamGeometry, view: int, column: int, axes, centre) -> tuple[np.ndarray, np.ndarray]:
    """(source, detector point): the in-plane ends, from `centre`, of the ray through the middle of
    `column` (at the detector's middle row)."""
    n_cols = geometry.det_shape[1]
    offset = (column - (n_cols - 1) / 2.0) * geometry.pixel_pitch[1]
    target = geometry.det_centers[view] + offset * geometry.det_u[view]
    return (geometry.sources[view] - centre)[list(axes)], (target - centre)[list(axes)]


def _edge_ray_foot(geometry: ConeBeamGeometry, view: int, column: int, axes, centre, ends=None) -> np.ndarray:
    """In-plane vector from the rotation axis (through `centre`) to the nearest point of the ray through
    the middle of `column` (at the detector's middle row); `ends`: its `_edge_ray_ends`, where the caller
    has them already."""
    source, target = ends if ends is not None else _edge_ray_ends(geometry, view, column, axes, centre)
    if geometry.parallel:
        direction = (geometry.det_centers[view] - geometry.sources[view])[list(axes)]
        start = target
    else:
        direction = target - source
        start = source
    direction = direction / max(float(np.linalg.norm(direction)), 1e-12)
    return start - float(start @ direction) * direction


def edge_rays(projections: np.ndarray, geometry: ConeBeamGeometry, threshold: float, axes, centre,
              columns=None) -> EdgeRays:
    """The rays of the `columns` (default: both edges) and the object's radius each gives (the module's
    docstring says how). Reads one view at a time (a large scan is never copied whole), at most
    MAX_VIEWS of them."""
    from .support import _box3

    n_views, _, n_cols = projections.shape
    feet, radii = [], []
    for view in evenly_spaced(n_views, MAX_VIEWS):
        image = np.asarray(projections[view], dtype=np.float32)
        thickest = image.max(axis=1)
        for column in ((0, n_cols - 1) if columns is None else columns):
            foot = _edge_ray_foot(geometry, int(view), column, axes, centre)
            r = float(np.linalg.norm(foot))
            feet.append(foot / max(r, 1e-12))
            edge = _box3(image[None, :, max(0, column - 1):column + 2])[0, :, 0 if column == 0 else -1]
            seen = (edge > threshold) & (thickest > 0)
            if np.count_nonzero(seen) < 3:
                radii.append((r, r))
                continue
            ratio = np.clip(edge[seen] / thickest[seen], 0.0, RATIO_CAP)
            radii.append((r, float(np.percentile(r / np.sqrt(1.0 - ratio ** 2), 90))))
    r, radius = np.asarray(radii, dtype=float).T
    return EdgeRays(np.asarray(feet, dtype=float), r, radius)


def reach_past_faces(rays: EdgeRays, axes, lo, hi, centre) -> np.ndarray:
    """(2, 2) mm the object goes past the low and high face of each of `axes` (0 where it does not):
    the median radius of the edge rays whose foot lies within WINDOW_DEGREES of the face's outward
    normal, less the face's distance from the axis. A face no ray's foot faces (an arc too short to
    go round) takes the median over all of them."""
    reach = np.zeros((2, 2))
    near = math.cos(math.radians(WINDOW_DEGREES)) - 1e-9
    for i, axis in enumerate(axes):
        for k, sign in enumerate((-1.0, 1.0)):
            facing = sign * rays.foot[:, i] >= near
            radius = float(np.median(rays.radius[facing] if facing.any() else rays.radius))
            face = (hi[axis] - centre[axis]) if sign > 0 else (centre[axis] - lo[axis])
            reach[i, k] = max(radius - float(face), 0.0)
    return reach


def thin_reach_past_faces(projections: np.ndarray, geometry: ConeBeamGeometry, air_level: float, threshold: float,
                          axes, centre) -> np.ndarray:
    """(2, 2) mm something goes past the low and high face of each of `axes`, from the mass the views
    that cut the object miss (the module's docstring): per view, in the `MASS_ROWS` middle rows, that
    view's summed line integrals (less the air level) against what the views that cut nothing sum, over
    the line integrals of its column edges that see object (both share what is missed), back in the object's
    scale at the edge rays' feet; per face, the median over the edge rays that run along it
    (`THIN_WINDOW_DEGREES`), an edge that sees air reading 0.

    Views 180 degrees apart are averaged first where the orbit has them: a cone beam weights the mass
    near the source more than the mass near the detector, and the pair cancels that to first order (the
    second order, (object's extent / source distance)^2, is what is left: 3 % on a 1000 mm orbit, a few
    mm on the estimate). Reads one view's middle band at a time. Zero on a displaced detector
    (orbit.DisplacedDetector), whose views each miss half the object by design."""
    from .orbit import displaced_detector

    if displaced_detector(geometry) is not None:
        return np.zeros((2, 2))
    n_views, n_rows, n_cols = projections.shape
    half_band = max(1, min(MASS_ROWS, n_rows) // 2)
    r0, r1 = max(0, n_rows // 2 - half_band), min(n_rows, n_rows // 2 + half_band)
    pitch = float(geometry.pixel_pitch[1])
    mass = np.empty((n_views, r1 - r0))
    edges = np.empty((n_views, 2, r1 - r0))
    for view in range(n_views):
        band = np.asarray(projections[view, r0:r1, :], dtype=np.float64) - air_level
        mass[view] = band.sum(axis=1) * pitch
        edges[view] = band[:, :2].mean(axis=1), band[:, -2:].mean(axis=1)
    seen = edges > threshold - air_level
    ax = list(axes)
    direction = (geometry.det_centers - geometry.sources)[:, ax]
    angle = np.arctan2(direction[:, 1], direction[:, 0])
    step = float(np.median(np.abs(np.diff(np.unwrap(angle))))) if n_views > 1 else 2 * math.pi
    opposite = np.abs((angle[None, :] - angle[:, None]) % (2 * math.pi) - math.pi)  # 0: 180 degrees apart
    partner = np.argmin(opposite, axis=1)
    paired = opposite[np.arange(n_views), partner] <= min(0.25 * step, math.radians(2.0))
    mass = np.where(paired[:, None], (mass + mass[partner]) / 2.0, mass)
    # what every view should sum: the median over the views (pairs) both of whose edges see air in the
    # band (one bad pair among three or more moves nothing), or the most any view sums where every view
    # cuts the object
    clear = ~seen.any(axis=(1, 2))
    clear &= np.where(paired, clear[partner], True)
    whole = np.median(mass[clear], axis=0) if clear.any() else mass.max(axis=0)
    missed = whole[None, :] - mass
    edge_sum = np.where(seen, edges, 0.0).sum(axis=1)  # (views, rows)
    feet = np.empty((n_views, 2, 2))
    past = np.zeros(n_views)
    for view in range(n_views):
        scale = []
        for j, column in enumerate((0, n_cols - 1)):
            source, target = ends = _edge_ray_ends(geometry, view, column, axes, centre)
            foot = _edge_ray_foot(geometry, view, column, axes, centre, ends)
            feet[view, j] = foot / max(float(np.linalg.norm(foot)), 1e-12)
            if not geometry.parallel:  # detector mm per object mm at the foot, along the edge ray
                scale.append(float(np.linalg.norm(target - source)) / max(float(np.linalg.norm(foot - source)), 1e-9))
        usable = edge_sum[view] > 2.0 * (threshold - air_level)
        if np.count_nonzero(usable) * 2 >= usable.size:
            past[view] = max(float(np.median(missed[view, usable] / edge_sum[view, usable])), 0.0) / \
                (float(np.mean(scale)) if scale else 1.0)
    sees = seen.mean(axis=2) > 0.5  # (views, 2): that edge sees object in most of the band
    near = math.cos(math.radians(max(THIN_WINDOW_DEGREES, 0.6 * math.degrees(step)))) - 1e-9
    reach = np.zeros((2, 2))
    for i in range(2):
        for k, sign in enumerate((-1.0, 1.0)):
            along = sign * feet[:, :, i] >= near  # (views, 2) edge rays running along this face
            if along.any():
                reach[i, k] = float(np.median(np.where(sees, past[:, None], 0.0)[along]))
    return reach


def inner_voxel_count(grid: VolumeGrid, box_lo, box_hi) -> int:
    """Voxels of `grid` (axis-aligned) whose centres lie in the box (lo, hi): the training voxels inside
    the output box, which the data-derived TV weight counts (what lies past the box is only seen by some
    views or some rows, and would raise the weight of the whole volume by its share)."""
    count = 1
    for a in range(3):
        centres = grid.origin_xyz[a] + grid.spacing_xyz[a] * np.arange(grid.shape_xyz[a])
        count *= int(np.count_nonzero((centres >= box_lo[a] - 1e-6) & (centres <= box_hi[a] + 1e-6)))
    return count
