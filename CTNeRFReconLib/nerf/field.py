"""TensoRF-VM attenuation field: three planes, three lines, a linear basis and softplus.

Layout (shared with kernels/ and CTNeRFReconLib.fused): planes (3, C, R, R), lines (3, C, R).
Mode 0 = plane over (x, y) [c, iy, ix] times line over z; mode 1 = plane over (x, z) [c, iz, ix]
times line over y; mode 2 = plane over (y, z) [c, iz, iy] times line over x. Box coordinates
q = 2 (p - box_min) / (box_max - box_min) - 1 map [-1, 1] onto samples 0..R-1 (align_corners).

mu(p) = mu_scale * softplus(sum_{m,c} basis[m C + c] P_mc(p) L_mc(p) + bias)

The field can be evaluated at any points (export on any grid), and *materialised* on a regular
grid in one go: bilinear/linear interpolation is separable, so sampling the planes at every voxel
centre is two small matrix products per plane (`interp_matrix`), and the volume is three batched
outer products. On a CPU this is far cheaper than looking up the six factors at every ray
sample, so training renders the materialised grid (see train.py) while the field stays exact.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import VolumeGrid


def interp_matrix(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """(n, R) linear-interpolation weights sampling a length-R signal at coords in [-1, 1].

    align_corners=True and zero padding, as torch.grid_sample; rows for coords outside are zero.
    """
    pos = (coords + 1.0) * 0.5 * (resolution - 1)
    lo = torch.floor(pos)
    frac = pos - lo
    lo = lo.long()
    n = coords.shape[0]
    w = torch.zeros(n, resolution, dtype=coords.dtype, device=coords.device)
    rows = torch.arange(n, device=coords.device)
    for idx, wt in ((lo, 1.0 - frac), (lo + 1, frac)):
        ok = (idx >= 0) & (idx < resolution)
        w[rows[ok], idx[ok]] += wt[ok]
    return w


class VMField(torch.nn.Module):
    """Decoder and geometry of a VM field; the factors are passed in (from a generator or parameters)."""

    def __init__(self, channels: int, box_min, box_max, mu_scale: float, bias_init: float = -3.0):
        super().__init__()
        self.channels = channels
        self.register_buffer("box_min", torch.as_tensor(np.asarray(box_min), dtype=torch.float32))
        self.register_buffer("box_max", torch.as_tensor(np.asarray(box_max), dtype=torch.float32))
        self.mu_scale = float(mu_scale)
        self.basis = torch.nn.Parameter(torch.full((3 * channels,), 1.0 / np.sqrt(channels)))
        self.bias = torch.nn.Parameter(torch.tensor([bias_init]))

    # -- helpers ----------------------------------------------------------------------------
    def box_coords(self, points: torch.Tensor) -> torch.Tensor:
        return 2.0 * (points - self.box_min) / (self.box_max - self.box_min) - 1.0

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return self.mu_scale * F.softplus(pre)

    # -- evaluation -------------------------------------------------------------------------
    def pre_activation_at(self, planes: torch.Tensor, lines: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Decoder input at world points (N, 3), via grid_sample (the reference path)."""
        q = self.box_coords(points).to(planes.dtype)
        x, y, z = q[:, 0], q[:, 1], q[:, 2]
        pairs = ((x, y, z), (x, z, y), (y, z, x))  # (plane's last axis, plane's first axis, line axis)
        c = self.channels
        out = self.bias.to(planes.dtype).expand(points.shape[0]).clone()
        for m, (a, b, l) in enumerate(pairs):
            pg = torch.stack([a, b], dim=-1).reshape(1, 1, -1, 2)
            p = F.grid_sample(planes[m:m + 1], pg, mode="bilinear", padding_mode="zeros",
                              align_corners=True).reshape(c, -1)
            lg = torch.stack([torch.zeros_like(l), l], dim=-1).reshape(1, 1, -1, 2)
            li = F.grid_sample(lines[m:m + 1, :, :, None], lg, mode="bilinear", padding_mode="zeros",
                               align_corners=True).reshape(c, -1)
            out = out + (self.basis[m * c:(m + 1) * c, None].to(planes.dtype) * p * li).sum(0)
        return out

    def attenuation_at(self, planes, lines, points, chunk: int = 1 << 20) -> torch.Tensor:
        """mu at world points (N, 3), chunked."""
        outs = []
        for i in range(0, points.shape[0], chunk):
            pts = points[i:i + chunk]
            inside = (self.box_coords(pts).abs() <= 1.0).all(dim=1)
            outs.append(self.activation(self.pre_activation_at(planes, lines, pts)) * inside)
        return torch.cat(outs) if outs else points.new_zeros(0)

    def materialize(self, planes: torch.Tensor, lines: torch.Tensor, grid: VolumeGrid) -> torch.Tensor:
        """mu on every voxel centre of an axis-aligned grid, (z, y, x): exact, differentiable."""
        if not grid.is_axis_aligned:
            raise ValueError("materialize needs an axis-aligned grid; use attenuation_at for others")
        dev, dt = planes.device, planes.dtype
        axes, inside = [], []
        for a in range(3):
            n = grid.shape_xyz[a]
            w = grid.origin_xyz[a] + grid.spacing_xyz[a] * torch.arange(n, device=dev, dtype=torch.float64)
            q = 2.0 * (w - self.box_min[a].double()) / (self.box_max[a] - self.box_min[a]).double() - 1.0
            axes.append(interp_matrix(q, planes.shape[-1]).to(dt))
            inside.append(((q >= -1.0) & (q <= 1.0)).to(dt))
        wx, wy, wz = axes
        mx, my, mz = inside
        c = self.channels
        b = self.basis.to(dt)
        p0 = wy @ planes[0] @ wx.T * b[:c, None, None]           # (C, ny, nx)
        p1 = wz @ planes[1] @ wx.T * b[c:2 * c, None, None]      # (C, nz, nx)
        p2 = wz @ planes[2] @ wy.T * b[2 * c:, None, None]       # (C, nz, ny)
        l0 = lines[0] @ wz.T                                      # (C, nz)
        l1 = lines[1] @ wy.T                                      # (C, ny)
        l2 = lines[2] @ wx.T                                      # (C, nx)
        pre = (torch.einsum("cyx,cz->zyx", p0, l0) + torch.einsum("czx,cy->zyx", p1, l1)
               + torch.einsum("czy,cx->zyx", p2, l2))
        # the field is zero outside its box (interp rows are zero there, but softplus(bias) is not)
        box_mask = mz[:, None, None] * my[None, :, None] * mx[None, None, :]
        return self.activation(pre + self.bias.to(dt)) * box_mask
