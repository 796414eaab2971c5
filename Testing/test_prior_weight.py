"""The TV prior's weight comes from the scan: its noise level and its rays per voxel."""
from __future__ import annotations

import json

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


def _with_gain_pattern(scan: ScanData, sigma: float, seed: int = 1) -> ScanData:
    """Every pixel's gain off by a normal factor (the same in every view): after the log, an offset fixed on
    the detector, as a flat field that has drifted leaves it."""
    gain = 1.0 + sigma * np.random.default_rng(seed).standard_normal(scan.projections.shape[1:])
    return ScanData((scan.projections - np.log(gain)[None]).astype(np.float32), scan.geometry, "synthetic",
                    "<gain pattern>")


def test_a_pattern_fixed_on_the_detector_is_not_noise(clean):
    """A gain error left by the flat field reads as noise within a view and not across views: the noise law
    and the TV weight follow the photons, and the pattern is measured and said apart."""
    scan, ref = clean
    hit = np.ones(scan.projections.shape, dtype=bool)
    i0, sigma = 2e4, 0.01  # a pattern of 1 % against photon noise of 0.7 % in air
    photons = _with_photons(scan, i0)
    patterned = _with_gain_pattern(photons, sigma)
    plain, law = noise_law(photons.projections, hit), noise_law(patterned.projections, hit)
    assert law.air_variance == pytest.approx(1.0 / i0, rel=0.15), law
    assert law.air_variance == pytest.approx(plain.air_variance, rel=0.1)
    assert law.fixed_pattern_variance == pytest.approx(sigma ** 2, rel=0.3), law
    assert plain.fixed_pattern_variance < 0.1 * sigma ** 2
    # read within each view, as before, the pattern counted as noise: 3x the photons' variance here
    from CTNeRFReconLib.nerf.prior_weight import air_medians, immerkaer_variance
    views = patterned.projections
    within = immerkaer_variance(views, np.stack([air_medians(v) < 0.01 * float(np.percentile(views, 99))
                                                 for v in views]))[0]
    assert within > 2.5 / i0

    # each ray's variance is the photons' (growing with exp(p)) plus the pattern's (the same for every ray),
    # not the within-view variance times exp(p)
    # (on the phantom at 4x its attenuation, where exp(p) tells the two laws apart)
    dense = ScanData(scan.projections * 4.0, scan.geometry, "synthetic", "<dense phantom>")
    photons = _with_photons(dense, i0)
    patterned = _with_gain_pattern(photons, sigma)
    law = noise_law(patterned.projections, hit)
    messages = []
    trainer = NerfTrainer(patterned, ref.grid, NerfConfig(), RunContext(on_message=messages.append))
    reference = _trainer(photons, ref.grid)
    assert trainer.noise_variance == pytest.approx(reference.noise_variance + law.fixed_pattern_variance, rel=0.1)
    as_one = (law.air_variance + law.fixed_pattern_variance) * float(trainer.targets.double().exp().mean())
    assert trainer.noise_variance < 0.75 * as_one, (trainer.noise_variance, as_one)
    p = reference.targets.double()
    thick, thin = p > 1.0, p < 0.05
    ratio = float(trainer.ray_weights[thick].double().mean() / trainer.ray_weights[thin].double().mean())
    ratio_photons = float(reference.ray_weights[thick].double().mean() / reference.ray_weights[thin].double().mean())
    assert ratio_photons < ratio < 1.0  # the pattern weighs on thin rays most: the weights are flatter
    assert trainer.ctx.report["data_term"]["fixed_pattern_rms"] == pytest.approx(sigma, rel=0.2)
    assert any("fixed on the detector" in m and "rings" in m for m in messages), messages
    assert not any("fixed on the detector" in m for m in _messages_of(photons, ref.grid))


def _messages_of(scan: ScanData, grid) -> list[str]:
    messages = []
    NerfTrainer(scan, grid, NerfConfig(), RunContext(on_message=messages.append))
    return messages


def test_info_and_the_panel_name_a_gain_pattern(tmp_path, capsys):
    """`info` (what the panel's scan line reads, through `info --json`) measures the air's photon noise and
    fixed pattern, and names a pattern larger than the noise with its cure; the intact scan gets no such line."""
    from CTNeRFReconLib.cli import main
    from CTNeRFReconLib.slicer_bridge.projections import describe_summary
    from worker_case import write_edited_case, write_small_case

    case = write_small_case(tmp_path / "case")
    sigma = 0.02
    gain = 1.0 + sigma * np.random.default_rng(4).standard_normal((48, 48))
    patterned = write_edited_case(case, tmp_path / "patterned",
                                  lambda stack: stack.__isub__(np.log(gain).astype(stack.dtype)[None]))
    said = {}
    for name, folder in (("intact", case), ("patterned", patterned)):
        assert main(["info", str(folder), "--no-support", "--json"]) == 0
        said[name] = json.loads(capsys.readouterr().out)
    noise, intact = said["patterned"]["air_noise"], said["intact"]["air_noise"]
    assert noise["photon_sigma"] == pytest.approx(intact["photon_sigma"], rel=0.15)
    assert noise["fixed_pattern_rms"] == pytest.approx(sigma, rel=0.25), noise
    assert intact["fixed_pattern_rms"] < noise["photon_sigma"]
    assert any("pattern fixed on the detector" in n and "new flat field" in n for n in said["patterned"]["notes"])
    assert not any("pattern fixed on the detector" in n for n in said["intact"]["notes"])
    assert "gain pattern the flat field left" in describe_summary(said["patterned"])
    assert "gain pattern" not in describe_summary(said["intact"])
    assert main(["info", str(patterned), "--no-support"]) == 0
    text = capsys.readouterr().out
    assert "rings are likely" in text
    assert f"air: photon noise {noise['photon_sigma']:.4f} in line integral (1 / its variance: " in text
    assert f"a pattern fixed on the detector of {noise['fixed_pattern_rms']:.4f} rms" in text


def test_noise_a_blur_made_smooth_is_read_whole(clean):
    """A panel's scintillator spreads each photon's light over neighbouring pixels, so its noise is not white:
    Immerkaer's estimator, which reads the finest scale, sees a quarter of a pixel's variance under a
    [0.15, 0.7, 0.15] blur. The spread between views reads all of it, and the per-ray law follows it."""
    from scipy import ndimage

    from CTNeRFReconLib.nerf.prior_weight import immerkaer_variance

    scan, _ = clean
    i0, taps = 2e4, np.array([0.15, 0.7, 0.15])
    counts = np.random.default_rng(3).poisson(i0 * np.exp(-scan.projections.astype(np.float64)))
    blurred = ndimage.convolve1d(ndimage.convolve1d(counts.astype(np.float64), taps, axis=1), taps, axis=2)
    proj = (-np.log(blurred.clip(1.0) / i0)).astype(np.float32)
    truth = float((taps ** 2).sum() ** 2) / i0  # a pixel's variance in air after the blur
    hit = np.ones(proj.shape, dtype=bool)
    law = noise_law(proj, hit)
    assert law.air_variance == pytest.approx(truth, rel=0.15), (law.air_variance, truth)
    corner = np.zeros(proj.shape, dtype=bool)
    corner[:, :8, :8] = True  # air in every view
    assert immerkaer_variance(proj, corner)[0] < 0.4 * truth  # what reading the finest scale alone gives
    assert law.fixed_pattern_variance < 0.1 * truth  # a blur is not a pattern fixed on the detector
    # white noise is read as before
    white = noise_law(_with_photons(scan, i0).projections, hit)
    assert white.air_variance == pytest.approx(1.0 / i0, rel=0.1)
