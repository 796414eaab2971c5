"""A dense detail grid added to the VM field in the refinement phase.

Why: a TensoRF-VM field of rank C cannot hold every voxel-scale structure of a real CT. Fitted
directly to the ground truth of the team's abdomen case (no projections at all), the VM field of
the default size (C = 16, R = 122) tops out near 34.4 dB, and three times the channels only adds
0.4 dB: the low-rank form, not the optimiser, is the ceiling. The deep-prior VM field gives the
global structure; this grid, learned only in the last phase under the same TV prior, adds what
lies outside its span (a low-rank plus dense decomposition, as in L+S reconstruction). On the
50-view abdomen case it lifts the result from 34.4 dB to 36.3 dB (docs/nerf.md).

The grid lives on the training grid; it is evaluated anywhere by trilinear interpolation,
clamped at the outermost voxel centres and zero outside the field's box, so the reconstruction
can still be exported on any grid.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import VolumeGrid
from .field import interp_matrix


class DetailGrid(torch.nn.Module):
    """Attenuation added to the field on the training grid (z, y, x), starting at zero."""

    def __init__(self, grid: VolumeGrid, device=None):
        super().__init__()
        if not grid.is_axis_aligned:
            raise ValueError("the detail grid needs an axis-aligned training grid")
        self.grid = grid
        self.values = torch.nn.Parameter(torch.zeros(grid.shape_zyx, device=device))

    def forward(self) -> torch.Tensor:
        """The values on the training grid itself."""
        return self.values

    def _index(self, world: torch.Tensor, axis: int) -> torch.Tensor:
        return (world - self.grid.origin_xyz[axis]) / self.grid.spacing_xyz[axis]

    def on_grid(self, grid: VolumeGrid) -> torch.Tensor:
        """Values on any grid (z, y, x): separable interpolation when it is axis-aligned."""
        if not grid.is_axis_aligned:
            pts = torch.as_tensor(grid.world_points(np.float32), device=self.values.device).reshape(-1, 3)
            return self.at(pts).reshape(grid.shape_zyx)
        lo, hi = self.grid.bounds()
        out = self.values
        for axis in range(3):  # x, y, z are tensor dims 2, 1, 0
            n = self.grid.shape_xyz[axis]
            w = grid.origin_xyz[axis] + grid.spacing_xyz[axis] * torch.arange(grid.shape_xyz[axis],
                                                                             dtype=torch.float64)
            idx = self._index(w, axis).clamp(0, n - 1)
            q = 2.0 * idx / (n - 1) - 1.0 if n > 1 else torch.zeros_like(idx)
            m = interp_matrix(q, n) * ((w >= lo[axis]) & (w <= hi[axis]))[:, None]
            m = m.to(device=out.device, dtype=out.dtype)
            out = torch.movedim(torch.tensordot(m, torch.movedim(out, 2 - axis, 0), dims=1), 0, 2 - axis)
        return out

    def at(self, points: torch.Tensor) -> torch.Tensor:
        """Values at world points (N, 3)."""
        lo, hi = (torch.as_tensor(b, dtype=points.dtype, device=points.device) for b in self.grid.bounds())
        size = torch.tensor(self.grid.shape_xyz, dtype=points.dtype, device=points.device)
        origin = torch.tensor(self.grid.origin_xyz, dtype=points.dtype, device=points.device)
        spacing = torch.tensor(self.grid.spacing_xyz, dtype=points.dtype, device=points.device)
        g = 2.0 * (points - origin) / (spacing * (size - 1).clamp_min(1)) - 1.0
        vals = F.grid_sample(self.values[None, None].to(points.dtype), g.reshape(1, 1, 1, -1, 3),
                             mode="bilinear", padding_mode="border", align_corners=True).reshape(-1)
        inside = ((points >= lo) & (points <= hi)).all(dim=1)
        return vals * inside
