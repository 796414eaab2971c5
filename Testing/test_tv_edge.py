"""The TV prior's edge scale (NerfConfig.tv_edge): what it is for, shown on a denoising problem.

Plain TV shrinks the contrast of a small object by about lambda x perimeter / area (the known bias of
TV regularisation); the edge-scaled penalty, edge * log(1 + |d| / edge), charges a real edge little
more than its first `edge` of height, so the object keeps its contrast while noise (differences well
below the edge scale) is flattened as by TV.
"""
from __future__ import annotations

import pytest
import torch

from CTNeRFReconLib import fused
from CTNeRFReconLib.nerf.adam import Adam


def _denoise(noisy: torch.Tensor, weight: float, edge: float, steps: int = 400) -> torch.Tensor:
    """argmin_u mean((u - noisy)^2) + weight * TV_edge(u), by Adam (the trainer's optimiser)."""
    u = noisy.clone().requires_grad_(True)
    opt = Adam([u], lr=0.02)
    for it in range(steps):
        for g in opt.param_groups:
            g["lr"] = 0.02 * (1 - it / steps) + 1e-4
        loss = ((u - noisy) ** 2).mean() + weight * fused.total_variation(u, edge)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return u.detach()


def test_the_edge_scale_keeps_a_small_objects_contrast_where_plain_tv_loses_it():
    torch.manual_seed(0)
    truth = torch.zeros(24, 24, 24)
    truth[10:14, 10:14, 10:14] = 1.0  # a 4-voxel cube of contrast 1
    noisy = truth + 0.05 * torch.randn_like(truth)
    inside = truth > 0.5
    shell = torch.zeros_like(inside)
    shell[4:20, 4:20, 4:20] = True
    shell &= ~torch.nn.functional.max_pool3d(truth[None, None], 5, 1, 2)[0, 0].bool()  # background near it
    results = {}
    for name, edge in (("plain", 0.0), ("edge", 0.1)):
        u = _denoise(noisy, weight=0.2, edge=edge)
        contrast = float(u[inside].mean() - u[shell].mean())
        noise = float(u[shell].std())
        results[name] = (contrast, noise, float(((u - truth) ** 2).mean()))
    (c_plain, n_plain, e_plain), (c_edge, n_edge, e_edge) = results["plain"], results["edge"]
    # TV's bias, about 3 x weight / side = 0.15 here: the cube lost more than a tenth of its contrast
    assert c_plain < 0.9, results
    assert c_edge > 0.95, results  # the edge-scaled penalty kept it
    assert n_edge < 0.2 * 0.05 and n_plain < 0.2 * 0.05, results  # both flatten the background's noise
    assert e_edge < 0.25 * e_plain, results


def test_the_trainer_charges_its_tv_with_the_configured_edge_scale():
    """tv_edge reaches the loss: the same first step costs less with the edge scale than with plain TV
    (the log penalty is below |d| everywhere), and run.json's report says which was used."""
    from CTNeRFReconLib.methods import RunContext
    from CTNeRFReconLib.nerf.config import NerfConfig
    from CTNeRFReconLib.nerf.train import NerfTrainer
    from nerf_case import small_phantom_case

    for bad in (-0.1, float("nan"), float("inf")):  # refused with the setting's name, before any work
        with pytest.raises(ValueError, match="tv_edge"):
            NerfConfig.from_settings({"tv_edge": bad})
    scan, ref = small_phantom_case(views=8, det=32, n=16)
    losses = {}
    for edge in (0.0, 0.03):
        torch.manual_seed(0)
        cfg = NerfConfig.from_settings({"iterations": 4, "tv_edge": edge, "tv_weight": 0.5})
        trainer = NerfTrainer(scan, ref.grid, cfg, RunContext())
        report = trainer.ctx.report["tv_prior"]
        assert report["edge"] == edge and report["weight"] == 0.5 and report["weight_from"] == "setting"
        assert report["edge_attenuation"] == pytest.approx(edge * trainer.field.mu_scale)
        losses[edge] = trainer.step(0, 1024)[0]
    assert losses[0.03] < losses[0.0], losses
