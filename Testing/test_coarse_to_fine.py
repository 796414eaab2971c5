"""Coarse-to-fine training (nerf/levels.py): the early iterations run on a coarser grid over the same
box, the refinement phase on the full grid, the time budget plans with the cheaper iterations, and the
result is as good as training on the full grid throughout."""
from __future__ import annotations

import time

import numpy as np
import pytest

from CTNeRFReconLib.methods import RunContext
from CTNeRFReconLib.metrics import psnr3d
from CTNeRFReconLib.nerf.config import NerfConfig
from CTNeRFReconLib.nerf.levels import COST_SHARES, FROZEN_VOXEL_FACTOR, LevelSchedule
from CTNeRFReconLib.nerf.train import NerfTrainer, TimeBudget, coarser_grid

from nerf_case import small_phantom_case


def test_level_schedule_boundaries_stay_before_the_refinement_phase():
    s = LevelSchedule((4.0, 2.0), 0.6, end_limit=0.5)
    assert s.boundaries(1000) == [250, 500]  # 0.6 is cut to the refinement phase's start
    assert [s.level_at(i, 1000) for i in (0, 249, 250, 499, 500, 999)] == [0, 0, 1, 1, 2, 2]
    assert [s.factor(k) for k in range(3)] == [4.0, 2.0, 1.0]
    assert not LevelSchedule().active and LevelSchedule().level_at(0, 10) == 0
    assert LevelSchedule.relative_cost(1.0) == pytest.approx(1.0)
    # measured on the 25-view abdomen's default grid: a coarse step 113 ms against 237 ms on the full grid
    # with the stratified rule, 104 against 188 ms with Joseph's (bench_scaling.py's profile)
    for integrator, measured in (("stratified", 113 / 237), ("joseph", 104 / 188)):
        assert LevelSchedule.relative_cost(2.0, integrator=integrator) == pytest.approx(measured, rel=0.1)
    # the refinement phase runs no generator; half the rays cost less
    assert LevelSchedule.relative_cost(1.0, generator=False) < LevelSchedule.relative_cost(1.0)
    assert LevelSchedule.relative_cost(1.0, rays=0.5) < LevelSchedule.relative_cost(1.0)


def test_a_coarser_grid_tiles_the_same_box():
    _, ref = small_phantom_case(views=6, det=24, n=24)
    g = ref.grid
    c = coarser_grid(g, 2.0)
    assert c.shape_xyz == tuple(int(round(n / 2)) for n in g.shape_xyz)
    np.testing.assert_allclose(np.asarray(c.bounds()), np.asarray(g.bounds()), atol=1e-9)
    assert coarser_grid(g, 1.0) is g


def _settings(**kw):
    base = dict(preset="preview", iterations=120, rays_start=2048, rays_end=4096, snapshot_every=0,
                eval_every=20, checkpoint_every=0)
    base.update(kw)
    return base


def test_the_trainer_trains_coarse_first_then_on_the_full_grid():
    scan, ref = small_phantom_case(views=12, det=32, n=24)
    cfg = NerfConfig.from_settings(_settings(coarse_levels=(2.0,), coarse_fraction=0.3, refine_fraction=0.5))
    seen = []
    trainer = NerfTrainer(scan, ref.grid, cfg, RunContext(device="cpu", settings={}))
    full = trainer.grid
    assert trainer.level_grid.n_voxels < full.n_voxels / 6
    coarse_samples = trainer.n_samples
    original_step = trainer.step

    def watch(it, n):
        seen.append((it, trainer.level_grid.shape_xyz, trainer.n_samples, trainer.phase))
        return original_step(it, n)

    trainer.step = watch
    vol = trainer.run()
    assert vol.array.shape == ref.grid.shape_zyx
    coarse = [s for s in seen if s[1] != full.shape_xyz]
    fine = [s for s in seen if s[1] == full.shape_xyz]
    assert [s[0] for s in coarse] == list(range(36))  # 30 % of 120
    assert all(s[3] == "generator" for s in coarse)
    assert fine and all(s[2] > 1.6 * coarse_samples for s in fine)  # samples follow the voxel size
    assert all(s[1] == full.shape_xyz for s in seen if s[3] == "direct")


def test_coarse_to_fine_is_as_good_as_the_full_grid_throughout():
    """Same iterations: coarse-to-fine must not cost quality (and both must reconstruct the phantom)."""
    scan, ref = small_phantom_case(views=16, det=40, n=32)
    scores = {}
    for name, levels in (("flat", ()), ("c2f", (2.0,))):
        # the schedule and prior the thresholds were set with (a full-grid generator phase after the
        # coarse one; plain TV, which this analytic phantom prefers: docs/nerf.md, the TV's edge scale;
        # the generator's planes starting at the lines' spread: at the default half spread this phantom
        # gives flat 23.81 / c2f 23.84 after 300 iterations, docs/nerf.md "The planes start at half the
        # lines' spread")
        cfg = NerfConfig.from_settings(_settings(iterations=300, coarse_levels=levels, refine_fraction=0.5,
                                                 coarse_fraction=0.35, tv_edge=0.0,
                                                 generator_plane_init_fraction=1.0))
        trainer = NerfTrainer(scan, ref.grid, cfg, RunContext(device="cpu", settings={}))
        scores[name] = psnr3d(ref.array, trainer.run().array)
    assert scores["flat"] > 24.0, scores  # a broken model lands far below
    assert scores["c2f"] > scores["flat"] - 0.5, scores


def test_the_time_budget_plans_with_the_cost_of_the_iterations_to_come():
    now = time.perf_counter()

    def budget(cost):
        b = TimeBudget(60.0, now - 10.0, 0, 2000, 8000, cost=cost)
        b.export_s = 0.0
        for it in range(1, 20):
            b._samples.append((it, now - 0.1 * (20 - it)))  # 10 it/s on the first (coarse) iterations
        return b.observe(20, lambda: None)

    uniform = budget(None)
    # the first 40 % of any plan cost a quarter of the rest: measured there, the later ones are slower
    two_speed = budget(lambda its, planned: np.where(its < 0.4 * planned, 0.25, 1.0))
    assert 450 <= uniform <= 520, uniform  # ~47 s left at 10 it/s
    assert two_speed < uniform, (two_speed, uniform)
    # its plan is what fits: 0.4 N at 0.1 s and 0.6 N at 0.4 s in the ~47 s left
    assert 160 <= two_speed <= 190, two_speed


def test_the_cost_model_charges_the_generator_only_in_its_phase():
    """A full-grid iteration of the generator phase costs the generator's share more than one of the
    refinement phase at the same ray batch; a coarse one costs about half (measured: 113 of 237 ms)."""
    scan, ref = small_phantom_case(views=8, det=24, n=20)
    cfg = NerfConfig.from_settings(_settings(iterations=400, coarse_levels=(2.0,), coarse_fraction=0.2,
                                             refine_fraction=0.5, curriculum_fraction=0.1,
                                             freeze_field_fraction=0.25))
    trainer = NerfTrainer(scan, ref.grid, cfg, RunContext(device="cpu", settings={}))
    cost = trainer.iteration_cost(np.arange(400), 400)
    coarse, generator_full, refine, frozen = cost[50], cost[150], cost[250], cost[350]
    shares = COST_SHARES[cfg.integrator]
    assert refine == pytest.approx(1.0 - shares.generator)
    assert generator_full == pytest.approx(1.0)
    assert 0.45 < coarse < 0.6
    assert trainer.refine_start == 200 and np.all(cost[200:300] == refine)
    # the last quarter has the field frozen: no materialising, no optimiser step for the factors
    assert frozen == pytest.approx(shares.integration + FROZEN_VOXEL_FACTOR * shares.voxels)
    assert np.all(cost[300:] == frozen) and frozen < refine
