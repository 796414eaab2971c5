"""The TV prior's weight comes from the scan: its noise level and its rays per voxel."""
from __future__ import annotations

import numpy as np
import pytest

from CTNeRFReconLib.data import ScanData
from CTNeRFReconLib.methods import RunContext
from CTNeRFReconLib.nerf.config import NerfConfig
from CTNeRFReconLib.nerf.prior_weight import noise_law
from CTNeRFReconLib.nerf.train import NerfTrainer

from nerf_case import small_phantom_case


@pytest.fixture(scope="module")
def clean():
    return small_phantom_case(views=16, det=48, n=32)


@pytest.fixture(scope="module")
def fine():
    """Finer detector pixels: the phantom's hard ellipsoid edges weigh less against the noise."""
    return small_phantom_case(views=4, det=96, n=32)


def _trainer(scan: ScanData, grid, **settings) -> NerfTrainer:
    return NerfTrainer(scan, grid, NerfConfig.from_settings(settings), RunContext())


def _with_noise(scan: ScanData, sigma: float, seed: int = 0) -> ScanData:
    noise = np.random.default_rng(seed).normal(0.0, sigma, scan.projections.shape)
    return ScanData((scan.projections + noise).astype(np.float32), scan.geometry, "synthetic", "<noisy>")


def _with_photons(scan: ScanData, i0: float, seed: int = 0) -> ScanData:
    """Poisson counts of i0 photons per pixel, log-transformed: the noise law of a real scanner."""
    counts = np.random.default_rng(seed).poisson(i0 * np.exp(-scan.projections)).clip(1, None)
    return ScanData((-np.log(counts / i0)).astype(np.float32), scan.geometry, "synthetic", "<photons>")


def test_noise_variance_is_recovered_from_the_projections(clean):
    scan, _ = clean
    hit = np.ones(scan.projections.shape, dtype=bool)
    for i0 in (1e3, 2e4):
        truth = float(np.exp(scan.projections.astype(np.float64)).mean()) / i0  # Poisson: var p = exp(p) / I0
        est = noise_law(_with_photons(scan, i0).projections, hit).mean_variance
        assert est == pytest.approx(truth, rel=0.15), (i0, est, truth)
    # exact projections: no noise in air, so none at all (the phantom's edges are not mistaken for it)
    assert noise_law(scan.projections, hit).mean_variance < 1e-3 / 2e4


def test_without_air_the_whole_projection_is_used(fine):
    scan, _ = fine
    # a constant offset leaves no air pixel (a truncated scan, or a flat field off by a constant)
    offset = ScanData(scan.projections + 1.0, scan.geometry, "synthetic", "<offset>")
    hit = np.ones(scan.projections.shape, dtype=bool)
    for sigma in (0.03, 0.06):
        est = noise_law(_with_noise(offset, sigma).projections, hit).mean_variance
        assert est == pytest.approx(sigma ** 2, rel=0.2), (sigma, est ** 0.5)
    assert noise_law(scan.projections, np.zeros_like(hit)).mean_variance == 0.0


def test_tv_weight_grows_with_noise_and_with_fewer_rays(clean):
    scan, ref = clean
    quiet = _trainer(_with_photons(scan, 9e4), ref.grid)
    loud = _trainer(_with_photons(scan, 1e4), ref.grid)
    # 9x the photons' noise variance is measured as such, and the weight follows it (the model-error
    # part, 1.25 % of the line integrals, is what keeps it from being exactly 9x)
    assert 7.5 < loud.noise_variance / quiet.noise_variance < 10.5
    assert 4.0 < loud.tv_weight / quiet.tv_weight < 9.0, (quiet.tv_weight, loud.tv_weight)

    sparse_scan, _ = small_phantom_case(views=8, det=48, n=32)
    sparse = _trainer(_with_photons(sparse_scan, 1e4), ref.grid)
    # half the views: half the rays per voxel, twice the weight
    assert sparse.tv_weight / loud.tv_weight == pytest.approx(2.0, rel=0.15)

    # exact projections: only the model-error part is left (sparse views still leave streaks to remove)
    exact, cfg = _trainer(scan, ref.grid), NerfConfig()
    assert exact.noise_variance < 1e-3 * quiet.noise_variance
    assert exact.tv_weight == pytest.approx(cfg.tv_strength * cfg.model_error ** 2 * exact.grid.n_voxels
                                            / len(exact.targets), rel=0.01)
    assert 0 < exact.tv_weight < 0.5 * quiet.tv_weight
    # an explicit weight is used as given
    assert _trainer(scan, ref.grid, tv_weight=0.05).tv_weight == 0.05


def test_pwls_weights_follow_the_photon_noise_law(clean, fine):
    """ray_weighting 'poisson': each ray weighs the inverse of its line integral's variance, exp(p) / I0
    (Poisson counts, log-transformed) plus the model error; uniform where the data show no noise law."""
    thin, ref = clean
    # 4x the phantom's attenuation: line integrals up to ~2.8, rays 16x noisier than air
    scan = ScanData(thin.projections * 4.0, thin.geometry, "synthetic", "<dense phantom>")
    i0 = 2e4
    exact = _trainer(scan, ref.grid, ray_weighting="uniform")
    assert exact.ray_weights is None  # least squares: every ray alike
    noisy = _trainer(_with_photons(scan, i0), ref.grid)  # the default
    p = exact.targets.double()  # the same rays in the same order, without the noise
    cfg = NerfConfig()
    truth = 1.0 / (p.exp() / i0 + cfg.model_error ** 2 * noisy.target_power)
    w = noisy.ray_weights.double()
    assert p.max() > 2.5  # thick rays are there to be down-weighted
    # the weights' law is the truth's up to a constant, to the noise of the estimate of 1 / I0
    ratio = w / truth
    assert float(ratio.std() / ratio.mean()) < 0.1, float(ratio.std() / ratio.mean())
    assert float(w[p > 2.0].mean() / w[p < 0.05].mean()) < 0.3
    # scaled by the mean variance: the data term is the MAP one the TV weight was derived against
    variance = 1.0 / truth
    assert float((w * variance).mean()) == pytest.approx(float(variance.mean()), rel=0.1)
    mean_one = _trainer(_with_photons(scan, i0), ref.grid, ray_weighting="poisson-mean1")
    assert float(mean_one.ray_weights.mean()) == pytest.approx(1.0, rel=1e-5)
    # exact projections: no photon noise to weigh, only the model error, the same for every ray
    flat = _trainer(scan, ref.grid, ray_weighting="poisson").ray_weights
    assert float(flat.max() / flat.min()) < 1.02
    # no air in any view (an offset flat field, a truncated scan): no noise law, so least squares
    offset = ScanData(fine[0].projections + 1.0, fine[0].geometry, "synthetic", "<offset>")
    no_air = _trainer(_with_noise(offset, 0.03), fine[1].grid, ray_weighting="poisson")
    assert no_air.ray_weights is None and no_air.ctx.report["data_term"]["weighting"] == "uniform"
    assert "no air" in no_air.ctx.report["data_term"]["reason"]  # run.json says why
    assert noisy.ctx.report["data_term"]["weighting"] == "poisson"
