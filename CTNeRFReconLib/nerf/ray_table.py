"""The training rays: every measured pixel whose ray crosses the training box, with its line integral.

Why a module of its own: a clinical scan (360 views of 768^2, 212 M pixels) held as rays (origin,
direction, near, far: 8 float32 a ray) takes 6.8 GB, and building them all at once in float64 took
more than the 24 GB of a 2-core machine (the run was killed). Here the rays are built a few million
at a time and kept only while they take at most `stored_bytes` (NerfConfig.stored_rays_bytes, 2 GiB).
Beyond that only each ray's pixel is kept (its flat index into the projections: 4 bytes below 2^31
pixels), and a batch's rays are computed from the geometry when it is drawn (7.6 ms for 32 768 rays
on 2 cores, a few per cent of such a run's step). Which pixels have a ray is decided a view's pixel grid
at a time (`rays.view_hits`, by `view_rays`' own arithmetic); the rays, kept or computed, come from
`rays.view_rays`, an element-wise computation, so they are the same float32 numbers either way
(Testing/test_ray_table.py).
"""
from __future__ import annotations

import numpy as np
import torch

from ..geometry import ConeBeamGeometry
from ..rays import view_hits, view_rays

BUILD_CHUNK_RAYS = 1 << 21
"""Pixels looked at once: the rays' float64 temporaries take about 0.4 GB."""


class RayTable:
    """The rays of some views of a scan that cross a box and were measured, in view-major storage order."""

    def __init__(self, geometry: ConeBeamGeometry, views, box_lo, box_hi, projections: np.ndarray,
                 defects: np.ndarray | None = None, device="cpu", stored_bytes: int = 2 << 30):
        self.geometry = geometry
        self.box = (np.asarray(box_lo, dtype=np.float64), np.asarray(box_hi, dtype=np.float64))
        self.device = torch.device(device)
        views = np.asarray(views, dtype=np.int64).reshape(-1)
        rows, cols = geometry.det_shape
        pixels = rows * cols
        self.hit_mask = np.zeros((len(views), rows, cols), dtype=bool)
        """(len(views), rows, cols): the pixels that have a ray here (they cross the box and were measured)."""
        store = len(views) * pixels * 32 <= stored_bytes
        per_chunk = max(1, BUILD_CHUNK_RAYS // pixels)
        index_type = np.int32 if geometry.n_views * pixels < 2 ** 31 else np.int64
        flat_parts, target_parts, ray_parts = [], [], []
        for start in range(0, len(views), per_chunk):
            chunk = views[start:start + per_chunk]
            hit = view_hits(geometry, chunk, *self.box)
            if defects is not None:  # pixels without a measurement (dead pixels): no ray to fit
                hit &= ~defects[chunk]
            self.hit_mask[start:start + len(chunk)] = hit
            k, r, c = np.nonzero(hit)  # view-major, as the pixels are stored
            v = chunk[k]
            target_parts.append(torch.as_tensor(projections[v, r, c], dtype=torch.float32))
            if store:
                rays = view_rays(geometry, v, r, c, *self.box, device="cpu")
                ray_parts.append((rays.origins, rays.directions, rays.t_near, rays.t_far))
            else:
                flat_parts.append(torch.as_tensor(((v * rows + r) * cols + c).astype(index_type)))
        self.targets = torch.cat(target_parts).to(self.device) if target_parts else torch.zeros(0, device=self.device)
        """(N,) the measured line integrals."""
        self._stored = None
        self._pixels = None
        if store:
            self._stored = tuple(torch.cat([p[k] for p in ray_parts]).to(self.device) if ray_parts
                                 else torch.zeros((0, 3) if k < 2 else (0,), device=self.device) for k in range(4))
        else:
            self._pixels = torch.cat(flat_parts) if flat_parts else torch.zeros(0, dtype=torch.int32)

    @property
    def stored(self) -> bool:
        """Whether the rays themselves are kept (else each batch's are computed)."""
        return self._stored is not None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def rays(self, idx: torch.Tensor):
        """(origins, directions, t_near, t_far) of the rays at positions `idx`, on the table's device."""
        if self._stored is not None:
            idx = idx.to(self.device)
            return tuple(t[idx] for t in self._stored)
        flat = self._pixels[idx.cpu()].numpy().astype(np.int64)
        rows, cols = self.geometry.det_shape
        view, pixel = np.divmod(flat, rows * cols)
        row, col = np.divmod(pixel, cols)
        b = view_rays(self.geometry, view, row, col, *self.box, device=self.device)
        return b.origins, b.directions, b.t_near, b.t_far

    def span(self, start: int, stop: int):
        """The rays at positions start..stop-1 (for passes over all of them in order)."""
        return self.rays(torch.arange(start, min(stop, len(self))))

    def chords(self, at_most: int = 100_000) -> torch.Tensor:
        """Lengths inside the box of about `at_most` rays evenly spread over the table."""
        picked = torch.arange(0, len(self), max(1, len(self) // max(1, at_most)))
        _, _, t_near, t_far = self.rays(picked)
        return t_far - t_near

    def nbytes(self) -> int:
        """What the table holds, in bytes (the rays or their pixels, and the targets)."""
        held = self._stored if self._stored is not None else (self._pixels,)
        return int(sum(t.element_size() * t.nelement() for t in held) + self.targets.element_size() * len(self))
