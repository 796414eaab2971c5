"""Deep image prior for the VM factors (the ZeroRF idea).

The three planes and three lines are not free parameters: they are the output of small
convolutional generators fed with fixed noise, and the generators' weights are what is
optimised. A convolutional generator produces smooth, natural structure first and noise last
(Ulyanov et al., "Deep Image Prior", 2018), which is the regulariser sparse views need
(Shi et al., "ZeroRF", 2024). `DirectFactors` is the plain TensoRF parameterisation, kept for
comparison and for users who want it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dims: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.conv = conv(cin, cout, 3, padding=1)
        # per-channel normalisation (batch of one): DIP generators train much faster with it
        self.norm = nn.GroupNorm(cout, cout)
        self.mode = "bilinear" if dims == 2 else "linear"

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=False)
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class _FactorGenerator(nn.Module):
    """Noise (1, k, r0[, r0]) -> conv/upsample stack -> (1, out, R[, R])."""

    def __init__(self, dims: int, out_channels: int, resolution: int, width: int, noise_channels: int,
                 n_up: int, generator: torch.Generator):
        super().__init__()
        self.resolution = resolution
        self.dims = dims
        r0 = max(2, math.ceil(resolution / 2 ** n_up))
        shape = (1, noise_channels) + (r0,) * dims
        self.register_buffer("noise", torch.randn(shape, generator=generator))
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.stem = conv(noise_channels, width, 3, padding=1)
        self.ups = nn.ModuleList(_UpBlock(width, width, dims) for _ in range(n_up))
        self.head = conv(width, out_channels, 1)

    def forward(self):
        x = F.leaky_relu(self.stem(self.noise), 0.2)
        for up in self.ups:
            x = up(x)
        x = self.head(x)
        size = (self.resolution,) * self.dims
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear" if self.dims == 2 else "linear",
                              align_corners=True)
        return x[0]


class FactorGenerator(nn.Module):
    """Generates planes (3, C, R, R) and lines (3, C, R) from fixed noise."""

    def __init__(self, channels: int, resolution: int, width: int = 64, noise_channels: int = 16,
                 seed: int = 0, init_scale: float = 1.0, plane_init_fraction: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed) + 7919)
        n_up = max(1, min(4, int(math.log2(max(resolution, 4))) - 3))
        self.channels, self.resolution = channels, resolution
        # the seed alone decides the noise and the initial weights (not the global RNG's state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.planes_net = _FactorGenerator(2, 3 * channels, resolution, width, noise_channels, n_up, g)
            self.lines_net = _FactorGenerator(1, 3 * channels, resolution, width, noise_channels, n_up, g)
        # learnable output gains: the lines start at a spread of init_scale whatever the depth, the
        # planes at plane_init_fraction of it (NerfConfig.generator_plane_init_fraction says why)
        self.plane_gain = nn.Parameter(torch.tensor(1.0))
        self.line_gain = nn.Parameter(torch.tensor(1.0))
        with torch.no_grad():
            p, l = self.planes_net(), self.lines_net()
            self.plane_gain.fill_(init_scale * plane_init_fraction / (p.std().item() + 1e-6))
            self.line_gain.fill_(init_scale / (l.std().item() + 1e-6))

    def forward(self):
        c, r = self.channels, self.resolution
        planes = (self.planes_net() * self.plane_gain).reshape(3, c, r, r)
        lines = (self.lines_net() * self.line_gain).reshape(3, c, r)
        return planes, lines


class DirectFactors(nn.Module):
    """TensoRF's plain parameterisation: the planes and lines are the parameters."""

    INIT_SCALE = 0.1
    """Standard deviation of the random initial factors, as TensoRF's (Chen et al., 2022) default: the
    products plane x line start near 0.01, so the initial field is nearly uniform (softplus of the
    bias). At unit scale the initial field was noise as strong as the object, which a no-prior ablation
    spent its budget removing (a strawman baseline, not the plain parameterisation at its best)."""

    def __init__(self, channels: int, resolution: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed) + 7919)
        scale = self.INIT_SCALE
        self.planes = nn.Parameter(scale * torch.randn(3, channels, resolution, resolution, generator=g))
        self.lines = nn.Parameter(scale * torch.randn(3, channels, resolution, generator=g))

    @classmethod
    def from_tensors(cls, planes: torch.Tensor, lines: torch.Tensor) -> "DirectFactors":
        """Free factors starting from given values (the generator's output when refining)."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.planes = nn.Parameter(planes.detach().clone())
        obj.lines = nn.Parameter(lines.detach().clone())
        return obj

    def forward(self):
        return self.planes, self.lines
