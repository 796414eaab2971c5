"""The default reconstruction grid: the region every view sees, at the detector's resolution.

A voxel outside some view's cone is constrained by fewer projections than the rest and comes out
unreliable, so by default the grid covers only the intersection of the view frusta (for a circular
orbit: a cylinder about the rotation axis with conical caps), with voxels as large as a detector
pixel seen at the isocentre. Each frustum is bounded by its source and its detector plane, so the
region is bounded even for a single view direction or a parallel beam.

A detector displaced sideways on an orbit that goes all the way round (an offset-detector or half-fan
scan, orbit.displaced_detector) is the exception: it sees a small circle in every view, but every line
through the circle its far edge reaches is measured once, from one side of the orbit or the other, so
that larger circle is measured completely and is the default grid's cross-section (as if each view's
detector were centred on its principal point and as wide as its far side). A voxel there is seen by
about half the views, each line once; the reconstruction methods need nothing more (FDK weights the
columns measured twice, fdk.py).
"""
from __future__ import annotations

import numpy as np

from .geometry import ConeBeamGeometry, VolumeGrid

MAX_DEFAULT_VOXELS = 512 ** 3
"""The default grid grows its voxel size rather than exceed this count (2 GiB of float32 work)."""


def isocentre(geometry: ConeBeamGeometry) -> np.ndarray:
    """The point closest (least squares) to every view's central ray (source to detector centre)."""
    d = geometry.det_centers - geometry.sources
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    # sum over views of the projector orthogonal to each ray: (I - d d^T)
    proj = np.eye(3)[None] - d[:, :, None] * d[:, None, :]
    a = proj.sum(axis=0)
    b = np.einsum("vij,vj->i", proj, geometry.sources)
    if np.linalg.matrix_rank(a) < 3:  # all rays parallel: take the middle of the central rays
        return ((geometry.sources + geometry.det_centers) / 2).mean(axis=0)
    return np.linalg.solve(a, b)


def pitch_at_isocentre(geometry: ConeBeamGeometry) -> float:
    """Detector pixel pitch (the finer of rows/columns) divided by the mean magnification."""
    pitch = min(geometry.pixel_pitch)
    if geometry.parallel:
        return pitch
    iso = isocentre(geometry)
    sdd = geometry.source_detector_distance()
    normal = np.cross(geometry.det_u, geometry.det_v)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    sid = np.abs(np.einsum("vi,vi->v", iso[None] - geometry.sources, normal))
    return float(pitch * np.mean(sid / sdd))


def view_halfspaces(geometry: ConeBeamGeometry, view: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with A p <= b exactly for the points p one view sees between its source and detector.

    Inside the detector rectangle means |(hit - c) . w| <= half-size for w = u, v, where hit is
    where the ray through p meets the detector; multiplied by the (positive) depth of p this is
    linear in p, so the region every view sees is a convex polytope.
    """
    n_v, n_u = geometry.det_shape
    halves = ((geometry.det_u[view], n_u / 2.0 * geometry.pixel_pitch[1]),
              (geometry.det_v[view], n_v / 2.0 * geometry.pixel_pitch[0]))
    s, c = geometry.sources[view], geometry.det_centers[view]
    normal = np.cross(geometry.det_u[view], geometry.det_v[view])
    normal /= np.linalg.norm(normal)
    depth = float((c - s) @ normal)
    if depth < 0:
        normal, depth = -normal, -depth
    rows, rhs = [-normal, normal], [-normal @ s, normal @ s + depth]  # between source and detector
    for w, half in halves:
        if geometry.parallel:
            axis = (c - s) / np.linalg.norm(c - s)
            w_eff = w - normal * (axis @ w) / (axis @ normal)
            rows += [w_eff, -w_eff]
            rhs += [half + w_eff @ c, half - w_eff @ c]
        else:
            a = (s - c) @ w
            for sign in (1.0, -1.0):
                row = sign * (a * normal + depth * w) - half * normal
                rows.append(row)
                rhs.append(row @ s)
    return np.asarray(rows), np.asarray(rhs)


def common_fov_bounds(geometry: ConeBeamGeometry) -> tuple[np.ndarray, np.ndarray]:
    """World box (lo, hi) enclosing exactly the points every view sees (six small linear programs)."""
    from scipy.optimize import linprog  # imported here: half a second that runs with a reference grid need not pay

    parts = [view_halfspaces(geometry, k) for k in range(geometry.n_views)]
    a_ub = np.concatenate([a for a, _ in parts])
    b_ub = np.concatenate([b for _, b in parts])
    lo, hi = np.zeros(3), np.zeros(3)
    for axis in range(3):
        for sign, out in ((1.0, lo), (-1.0, hi)):
            cost = np.zeros(3)
            cost[axis] = sign
            res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * 3, method="highs")
            if res.status != 0:
                raise ValueError("no point is seen by every view (the views' source-detector cones share "
                                 "no region); check the geometry's angles, distances and detector offsets, "
                                 "or give an explicit grid (--reference or --grid-size)")
            out[axis] = res.x[axis]
    if np.any(hi - lo <= 0):
        raise ValueError("the region seen by every view is flat (zero thickness); check the geometry's "
                         "angles and detector size, or give an explicit grid (--reference or --grid-size)")
    return lo, hi


def measured_geometry(geometry: ConeBeamGeometry) -> ConeBeamGeometry:
    """The geometry whose common field of view is the region the scan measures completely: itself, or
    for a displaced detector on a closed orbit each view's detector centred on its principal point and
    widened to its far side (the module's docstring says why). Only for the field of view's bounds: its
    pixels are not the data's."""
    import dataclasses

    from .orbit import displaced_detector

    displaced = displaced_detector(geometry)
    if displaced is None:
        return geometry
    centres = geometry.det_centers - displaced.offsets[:, None] * geometry.det_u
    n_u = geometry.det_shape[1]
    pitch_u = 2.0 * float(displaced.far.min()) / n_u
    return dataclasses.replace(geometry, det_centers=centres, pixel_pitch=(geometry.pixel_pitch[0], pitch_u))


def default_grid(geometry: ConeBeamGeometry, max_voxels: int = MAX_DEFAULT_VOXELS) -> VolumeGrid:
    """Axis-aligned grid over the common field of view (of `measured_geometry`: a displaced detector's
    whole circle), voxel size = detector pitch at the isocentre.

    The voxel size grows (isotropically) when the grid would exceed ``max_voxels``.
    """
    lo, hi = common_fov_bounds(measured_geometry(geometry))
    voxel = pitch_at_isocentre(geometry)
    extent = hi - lo
    shape = np.maximum(1, np.round(extent / voxel))
    if np.prod(shape) > max_voxels:
        voxel *= (np.prod(shape) / max_voxels) ** (1.0 / 3.0)
        shape = np.maximum(1, np.floor(extent / voxel))
    return VolumeGrid.centered(tuple(int(n) for n in shape), (voxel,) * 3, tuple((lo + hi) / 2.0))
