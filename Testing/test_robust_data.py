"""The data term's Huber zone (`robust_data`): rays that no field can fit must not drag the whole field.

Real projections hold such rays: a detector line stuck at zero (or dead pixels a reader turned into
zeros), a view blurred by motion. With least squares their huge residuals dominate the gradient; with
Huber's penalty past a few robust spreads of the batch's residuals each counts linearly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from CTNeRFReconLib.methods import RunContext, get_method
from CTNeRFReconLib.metrics import psnr3d
from CTNeRFReconLib.nerf.train import _huber_mean
from nerf_case import small_phantom_case
from test_dead_pixels import QUICK, _with_dead_column


def test_huber_is_least_squares_within_the_threshold_and_linear_beyond():
    r = torch.linspace(-1.0, 1.0, 101)
    assert torch.allclose(_huber_mean(r, 10.0), (r ** 2).mean())
    spread = 1.4826 * float(r.abs().median())
    outlier = torch.cat([r, torch.tensor([100.0])]).requires_grad_(True)
    value = _huber_mean(outlier, 3.0)
    delta = 3.0 * 1.4826 * float(outlier.detach().abs().median())
    assert delta == pytest.approx(3.0 * spread, rel=0.05)
    expected = ((r ** 2).sum() + 2 * delta * 100.0 - delta ** 2) / len(outlier)
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-5)
    value.backward()
    # the outlier's pull is 2 delta (over the batch), not 2 x 100
    assert float(outlier.grad[-1]) * len(outlier) == pytest.approx(2 * delta, rel=1e-4)


def _nerf(scan, grid, robust):
    settings = dict(QUICK, robust_data=robust)
    return get_method("nerf").reconstruct(scan, grid, RunContext(device="cpu", seed=0, settings=settings))


def test_a_column_stuck_at_zero_no_longer_spoils_the_fit():
    """One detector column through the phantom reads zero in every view, taken as measured (the stuck-pixel
    test would find this one; a line stuck at another wrong value it would not): least squares fits it with a
    dark band through the volume, Huber's zone does not."""
    scan, ref = small_phantom_case(noise_i0=2e4)
    stuck = _with_dead_column(scan, 0.0, detect=False)  # as if stuck at a value not found as dead
    plain, robust = (psnr3d(ref.array, _nerf(stuck, ref.grid, r).array) for r in (0.0, 4.0))
    assert robust > plain + 2.5, (robust, plain)
    clean_plain, clean_robust = (psnr3d(ref.array, _nerf(scan, ref.grid, r).array) for r in (0.0, 4.0))
    assert clean_robust > clean_plain - 0.3, (clean_robust, clean_plain)
    assert robust > clean_plain - 1.5, (robust, clean_plain)
