"""Analytic ellipsoid phantoms: exact line integrals and voxelisations, for the demo and the tests.

A ray through an ellipsoid has a closed-form chord length, so projections of an ellipsoid phantom
are exact, independent of any projector (ours or RTK's).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import VolumeGrid

MU_WATER = 0.02
"""Linear attenuation of water in 1/mm at about 70 keV (used for HU <-> mu)."""


@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid with additive attenuation ``value`` (1/mm)."""

    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    value: float
    rotation_z_deg: float = 0.0
    """Rotation of the ellipsoid's axes about world z (degrees)."""

    def _frame(self):
        a = np.radians(self.rotation_z_deg)
        r = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        return np.asarray(self.center, dtype=np.float64), r, np.asarray(self.semi_axes, dtype=np.float64)


def shepp_logan_3d(scale_mm: float = 100.0, mu_scale: float = MU_WATER) -> list[Ellipsoid]:
    """A 3D Shepp-Logan-like head phantom (Kak & Slaney's values, modified contrast), in mm.

    ``scale_mm`` is the half-size of the phantom; values are multiples of water attenuation.
    """
    s, m = scale_mm, mu_scale
    rows = [  # centre (x, y, z), semi-axes, value (relative), rotation
        ((0, 0, 0), (0.69, 0.92, 0.81), 1.0, 0),
        ((0, -0.0184, 0), (0.6624, 0.874, 0.78), -0.8, 0),
        ((0.22, 0, 0), (0.11, 0.31, 0.22), -0.2, -18),
        ((-0.22, 0, 0), (0.16, 0.41, 0.28), -0.2, 18),
        ((0, 0.35, -0.15), (0.21, 0.25, 0.41), 0.3, 0),
        ((0, 0.1, 0.25), (0.046, 0.046, 0.05), 0.3, 0),
        ((0, -0.1, 0.25), (0.046, 0.046, 0.05), 0.3, 0),
        ((-0.08, -0.605, 0), (0.046, 0.023, 0.05), 0.3, 0),
        ((0, -0.606, 0), (0.023, 0.023, 0.02), 0.3, 0),
        ((0.06, -0.605, 0), (0.023, 0.046, 0.02), 0.3, 0),
    ]
    return [Ellipsoid(tuple(np.multiply(c, s)), tuple(np.multiply(a, s)), v * m, r) for c, a, v, r in rows]


def chord_lengths(ell: Ellipsoid, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Exact length of each ray (N, 3 origins, unit directions) inside one ellipsoid."""
    c, r, a = ell._frame()
    o = ((origins - c) @ r) / a
    d = (directions @ r) / a
    qa = np.einsum("ij,ij->i", d, d)
    qb = 2 * np.einsum("ij,ij->i", o, d)
    qc = np.einsum("ij,ij->i", o, o) - 1.0
    disc = qb * qb - 4 * qa * qc
    return np.where(disc > 0, np.sqrt(np.clip(disc, 0, None)) / qa, 0.0)


def phantom_line_integrals(ellipsoids, origins, directions) -> np.ndarray:
    """Exact line integrals of an ellipsoid phantom along rays (unit directions)."""
    origins = np.asarray(origins, dtype=np.float64)
    directions = np.asarray(directions, dtype=np.float64)
    total = np.zeros(origins.shape[0])
    for e in ellipsoids:
        total += e.value * chord_lengths(e, origins, directions)
    return total


def phantom_values(ellipsoids, points: np.ndarray) -> np.ndarray:
    """Attenuation of the phantom at world points (N, 3)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    out = np.zeros(points.shape[0])
    for e in ellipsoids:
        c, r, a = e._frame()
        q = ((points - c) @ r) / a
        out += np.where(np.einsum("ij,ij->i", q, q) <= 1.0, e.value, 0.0)
    return out


def voxelize(ellipsoids, grid: VolumeGrid, supersample: int = 2) -> np.ndarray:
    """Mean phantom value in each voxel (z, y, x), by supersampling each voxel."""
    pts = grid.world_points(np.float64).reshape(-1, 3)
    spacing = np.asarray(grid.spacing_xyz)
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    acc = np.zeros(pts.shape[0])
    axes = grid.direction * spacing[None, :]
    for ox in offs:
        for oy in offs:
            for oz in offs:
                acc += phantom_values(ellipsoids, pts + axes @ np.array([ox, oy, oz]))
    return (acc / supersample ** 3).reshape(grid.shape_zyx).astype(np.float32)
