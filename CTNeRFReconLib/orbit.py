"""The orbit read off a geometry: its axis, each view's angle and angular weight, whether it closes.

No format's angle list or sign convention is trusted: the angles come from the source positions (cone
beam) or the ray directions (parallel beam). FDK weights its views with them (fdk.py), and the default
grid asks whether a displaced detector's orbit goes all the way round (fov.py). Torch-free, so that
fov.py can use it without importing torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .geometry import ConeBeamGeometry


@dataclass(frozen=True)
class Orbit:
    """Angles of the views about the orbit's axis, and what they cover."""

    axis: np.ndarray
    """Unit rotation axis; angles increase right-handedly about it."""
    angles: np.ndarray
    """(V,) radians from the start of the orbit (the view after its largest gap), in [0, period)."""
    dbeta: np.ndarray
    """(V,) angular weight of each view (half the distance between its neighbours)."""
    period: float
    """2 pi for cone beam; pi for parallel beam (a line and its reverse are the same line)."""
    coverage: float
    """Angle covered: the period when closed, else last - first angle plus one typical step."""
    closed: bool
    """False for a short scan or a limited-angle scan (one gap much wider than the others)."""


def isocentre(geometry: ConeBeamGeometry) -> np.ndarray:
    """Least-squares point nearest all central rays (source -> principal point)."""
    n = _normals(geometry)
    a = np.zeros((3, 3))
    b = np.zeros(3)
    for s, d in zip(geometry.sources, n):
        p = np.eye(3) - np.outer(d, d)
        a += p
        b += p @ s
    return np.linalg.lstsq(a, b, rcond=None)[0]


def _normals(geometry: ConeBeamGeometry) -> np.ndarray:
    """Unit normals of the detector planes, pointing from the source towards the detector."""
    n = np.cross(geometry.det_u, geometry.det_v)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    sign = np.sign(np.einsum("vi,vi->v", geometry.det_centers - geometry.sources, n))
    return n * np.where(sign == 0, 1.0, sign)[:, None]


def orbit(geometry: ConeBeamGeometry, centre: np.ndarray | None = None) -> Orbit:
    """The orbit's axis, angles and angular weights, from the source positions (cone beam) or the
    ray directions (parallel beam): formats' own angle lists and signs are never needed."""
    g = geometry
    if g.parallel:
        rel = g.det_centers - g.sources
        period = math.pi
    else:
        rel = g.sources - (isocentre(g) if centre is None else centre)
        period = 2 * math.pi
    rel = rel / np.linalg.norm(rel, axis=1, keepdims=True)
    if g.n_views >= 3 and np.linalg.svd(rel, compute_uv=False)[1] > 1e-6:
        axis = np.linalg.svd(rel)[2][2]
    elif g.n_views >= 2 and np.linalg.norm(np.cross(rel[0], rel[-1])) > 1e-9:
        axis = np.cross(rel[0], rel[-1])
    else:  # one view (or all alike): any axis across the view direction will do
        axis = np.cross(rel[0], g.det_v[0])
    axis = axis / np.linalg.norm(axis)
    e1 = rel[0] - (rel[0] @ axis) * axis
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    theta = np.mod(np.arctan2(rel @ e2, rel @ e1), period)
    v = g.n_views
    order = np.argsort(theta, kind="stable")
    st = theta[order]
    if v == 1:
        return Orbit(axis, np.zeros(1), np.array([period]), period, 0.0, False)
    cyc_gaps = np.diff(np.concatenate([st, [st[0] + period]]))
    big = int(np.argmax(cyc_gaps))
    step = float(np.median(cyc_gaps))
    # open orbit: one gap far wider than the typical step (RTK's rule is any gap over 20 degrees,
    # which would call a sparse full scan "short")
    closed = not cyc_gaps[big] > max(3 * step, math.pi / 9)
    if closed:
        ext = np.concatenate([[st[-1] - period], st, [st[0] + period]])
        w_sorted = (ext[2:] - ext[:-2]) / 2
        start = 0.0
        coverage = period
    else:
        start = st[(big + 1) % v]
        rt = np.sort(np.mod(st - start, period))
        gaps = np.diff(rt)
        inner_step = float(np.median(gaps)) if gaps.size else step
        ext = np.concatenate([[rt[0] - inner_step], rt, [rt[-1] + inner_step]])
        w_sorted = (ext[2:] - ext[:-2]) / 2
        coverage = float(rt[-1] - rt[0] + inner_step)
    dbeta = np.empty(v)
    rel_angles = np.mod(theta - start, period)
    order = np.argsort(rel_angles, kind="stable")
    dbeta[order] = w_sorted
    return Orbit(axis, rel_angles, dbeta, period, coverage, closed)


def angular_weights(geometry: ConeBeamGeometry, centre: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(dbeta per view, covered arc in radians) of the geometry's orbit."""
    o = orbit(geometry, centre)
    return o.dbeta, o.coverage


@dataclass(frozen=True)
class DisplacedDetector:
    """A detector displaced sideways on an orbit that goes all the way round: an offset-detector
    (half-fan) scan. Every line through the circle its far side reaches is measured once, from one side
    or the other, so that whole circle is measured completely; the band of columns either side of the
    principal point is measured twice (G. Wang, "X-ray micro-CT with a displaced detector array",
    Med. Phys. 29(7), 2002)."""

    offsets: np.ndarray
    """(V,) mm in the detector plane along det_u: the detector's centre less its principal point (the foot
    of the perpendicular from the source), the same sign in every view."""
    half_width: float
    """Half the detector's extent across its columns (mm, pixel edges)."""

    @property
    def overlap(self) -> np.ndarray:
        """(V,) mm either side of the principal point that the detector covers on both sides (the
        redundant band; negative when the detector does not reach the principal point)."""
        return self.half_width - np.abs(self.offsets)

    @property
    def near_edge(self) -> str:
        """The detector edge ("columns-" or "columns+", support.detector_edges_cut's names) next to the
        principal point: it sees object in every view, yet cuts nothing the orbit does not measure."""
        return "columns-" if float(np.median(self.offsets)) > 0 else "columns+"

    @property
    def far(self) -> np.ndarray:
        """(V,) mm from the principal point to the far edge."""
        return self.half_width + np.abs(self.offsets)


def principal_offsets(geometry: ConeBeamGeometry) -> np.ndarray:
    """(V,) mm along det_u from each view's principal point to its detector centre (0 for a centred
    detector; parallel beam: the detector centre's offset from the line through the rotation centre is
    not defined here, so 0)."""
    g = geometry
    if g.parallel:
        return np.zeros(g.n_views)
    principal = g.sources + g.source_detector_distance()[:, None] * _normals(g)
    return np.einsum("vi,vi->v", g.det_centers - principal, g.det_u)


def offset_detector(geometry: ConeBeamGeometry) -> DisplacedDetector | None:
    """The displacement of a cone-beam detector that sits off its principal point by more than one
    column pitch, to the same side in every view, whatever its orbit; None otherwise (a centred
    detector, a small calibration offset, or parallel beam)."""
    g = geometry
    if g.parallel or g.n_views < 3:
        return None
    offsets = principal_offsets(g)
    pitch = g.pixel_pitch[1]
    if not (np.all(offsets > pitch) or np.all(offsets < -pitch)):
        return None
    return DisplacedDetector(offsets, g.det_shape[1] * pitch / 2.0)


def displaced_detector(geometry: ConeBeamGeometry) -> DisplacedDetector | None:
    """`offset_detector` on a closed orbit, where the displacement still measures every line; None
    otherwise (also on a short scan, where it leaves lines unmeasured)."""
    offset = offset_detector(geometry)
    return offset if offset is not None and orbit(geometry).closed else None
