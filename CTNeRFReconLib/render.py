"""Beer-Lambert line integrals of an attenuation field: the PyTorch reference renderer.

Pure functions in NAF's spirit: sample points along each ray inside the volume box, evaluate the
field in chunks, integrate mu * dt. The fused kernels (kernels/) are checked against this path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import VolumeGrid
from .rays import RayBatch

FieldFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps world points (N, 3) in mm to attenuation (N,) in 1/mm."""


@dataclass
class RenderConfig:
    """How rays are sampled."""

    n_samples: int = 192
    """Samples per ray (midpoint rule between box entry and exit)."""
    jitter: bool = False
    """Stratified jitter: one uniform offset per sample inside its bin (training only)."""
    chunk_samples: int = 2_000_000
    """At most this many points are evaluated at once, to bound memory."""


def sample_along(rays: RayBatch, n_samples: int, jitter: bool, generator: torch.Generator | None = None):
    """Sample distances (N, S) and bin lengths (N, 1) between entry and exit of each ray."""
    n = len(rays)
    length = (rays.t_far - rays.t_near).clamp_min(0.0)
    dt = (length / n_samples)[:, None]
    base = torch.arange(n_samples, device=rays.origins.device, dtype=rays.origins.dtype)[None, :]
    if jitter:
        offs = torch.rand((n, n_samples), device=rays.origins.device, dtype=rays.origins.dtype,
                          generator=generator)
    else:
        offs = torch.full((1, n_samples), 0.5, device=rays.origins.device, dtype=rays.origins.dtype)
    t = rays.t_near[:, None] + (base + offs) * dt
    return t, dt


def line_integrals(field: FieldFn, rays: RayBatch, config: RenderConfig = RenderConfig(),
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Integral of mu along each ray, (N,). Differentiable with respect to the field."""
    n = len(rays)
    out = []
    per_chunk = max(1, config.chunk_samples // max(1, config.n_samples))
    for start in range(0, n, per_chunk):
        sub = rays.index(slice(start, start + per_chunk))
        t, dt = sample_along(sub, config.n_samples, config.jitter, generator)
        pts = sub.origins[:, None, :] + t[..., None] * sub.directions[:, None, :]
        mu = field(pts.reshape(-1, 3)).reshape(t.shape)
        out.append((mu * dt).sum(dim=1))
    if not out:
        return rays.origins.new_zeros((0,))
    return torch.cat(out)


def world_to_grid_coords(points: torch.Tensor, grid: VolumeGrid) -> torch.Tensor:
    """grid_sample coordinates in [-1, 1] (align_corners=True: -1 and 1 are the end voxel centres)."""
    m = torch.as_tensor(grid.index_to_world_matrix(), dtype=torch.float64)
    inv = torch.linalg.inv(m)
    a = inv[:3, :3].to(points)
    b = inv[:3, 3].to(points)
    idx = points @ a.T + b
    size = torch.as_tensor(grid.shape_xyz, dtype=points.dtype, device=points.device)
    return 2.0 * idx / (size - 1).clamp_min(1) - 1.0


class VoxelField(torch.nn.Module):
    """Trilinear interpolation of a voxel volume (z, y, x).

    Values fade linearly to zero over the outer half voxel (zero padding). RTK's Joseph projector
    integrates only between the first and last voxel centres: clip rays to `centre_bounds(grid)`
    to reproduce it.
    """

    def __init__(self, volume: torch.Tensor, grid: VolumeGrid):
        super().__init__()
        if tuple(volume.shape) != grid.shape_zyx:
            raise ValueError(f"volume shape {tuple(volume.shape)} does not match grid (z, y, x) {grid.shape_zyx}")
        self.volume = volume
        self.grid = grid

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return sample_volume(self.volume, self.grid, points)


def centre_bounds(grid: VolumeGrid):
    """Box spanned by the voxel centres (not edges) of an axis-aligned grid."""
    lo, hi = grid.bounds()
    half = np.asarray(grid.spacing_xyz) / 2.0
    return lo + half, hi - half


def sample_volume(volume: torch.Tensor, grid: VolumeGrid, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a (z, y, x) volume at world points (N, 3)."""
    coords = world_to_grid_coords(points, grid).to(volume.dtype)
    g = coords.reshape(1, 1, 1, -1, 3)
    vals = F.grid_sample(volume[None, None], g, mode="bilinear", padding_mode="zeros", align_corners=True)
    return vals.reshape(-1)
