"""Rays from the per-view geometry, clipped to a volume box (torch, any device)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .geometry import ConeBeamGeometry


@dataclass
class RayBatch:
    """A batch of rays: unit directions, and the entry/exit distances into the volume box."""

    origins: torch.Tensor
    """(N, 3) ray start points in mm (the source, or a point behind the pixel for parallel beam)."""
    directions: torch.Tensor
    """(N, 3) unit directions."""
    t_near: torch.Tensor
    """(N,) distance from origin where the ray enters the box."""
    t_far: torch.Tensor
    """(N,) distance where it leaves; t_far <= t_near means the ray misses the box."""

    def __len__(self) -> int:
        return int(self.origins.shape[0])

    def index(self, sel) -> "RayBatch":
        return RayBatch(self.origins[sel], self.directions[sel], self.t_near[sel], self.t_far[sel])


def clip_to_box(origins: torch.Tensor, directions: torch.Tensor, box_min, box_max):
    """Slab-method entry/exit distances of rays through an axis-aligned box.

    Rays that miss get t_near == t_far (zero length), so they integrate to exactly zero.
    """
    box_min = torch.as_tensor(np.asarray(box_min), dtype=origins.dtype, device=origins.device)
    box_max = torch.as_tensor(np.asarray(box_max), dtype=origins.dtype, device=origins.device)
    # Avoid division by zero for rays parallel to a slab: a tiny direction acts as "never crosses".
    safe = torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
    inv = 1.0 / safe
    t0 = (box_min - origins) * inv
    t1 = (box_max - origins) * inv
    t_near = torch.minimum(t0, t1).amax(dim=1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(dim=1)
    t_far = torch.maximum(t_far, t_near)
    return t_near, t_far


def view_rays(geometry: ConeBeamGeometry, views, rows, cols, box_min, box_max,
              device="cpu", dtype=torch.float32) -> RayBatch:
    """Rays for detector pixels given as flat arrays (view, row, col) of equal length."""
    views = np.asarray(views, dtype=np.int64).reshape(-1)
    rows = np.asarray(rows, dtype=np.float64).reshape(-1)
    cols = np.asarray(cols, dtype=np.float64).reshape(-1)
    n_v, n_u = geometry.det_shape
    su = (cols - (n_u - 1) / 2.0) * geometry.pixel_pitch[1]
    sv = (rows - (n_v - 1) / 2.0) * geometry.pixel_pitch[0]
    pix = (geometry.det_centers[views] + su[:, None] * geometry.det_u[views]
           + sv[:, None] * geometry.det_v[views])
    if geometry.parallel:
        d = geometry.det_centers[views] - geometry.sources[views]
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        center = (np.asarray(box_min) + np.asarray(box_max)) / 2.0
        span = float(np.linalg.norm(np.asarray(box_max) - np.asarray(box_min)))
        # start well behind the box, on the line through the pixel centre
        start = pix - d * (span + np.linalg.norm(pix - center, axis=1, keepdims=True))
    else:
        start = geometry.sources[views]
        d = pix - start
        d /= np.linalg.norm(d, axis=1, keepdims=True)
    o = torch.as_tensor(start, dtype=torch.float64)
    dd = torch.as_tensor(d, dtype=torch.float64)
    t_near, t_far = clip_to_box(o, dd, box_min, box_max)
    return RayBatch(o.to(device=device, dtype=dtype), dd.to(device=device, dtype=dtype),
                    t_near.to(device=device, dtype=dtype), t_far.to(device=device, dtype=dtype))


def all_pixel_indices(geometry: ConeBeamGeometry, views=None):
    """Flat (view, row, col) index arrays of every pixel of the given views (default: all)."""
    views = np.arange(geometry.n_views) if views is None else np.asarray(views)
    n_v, n_u = geometry.det_shape
    vv, rr, cc = np.meshgrid(views, np.arange(n_v), np.arange(n_u), indexing="ij")
    return vv.reshape(-1), rr.reshape(-1), cc.reshape(-1)
