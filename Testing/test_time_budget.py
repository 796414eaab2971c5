"""--time-limit: the schedule is planned from the measured rate so the run ends in time, and says so."""
from __future__ import annotations

import json
import time

import pytest

from CTNeRFReconLib.events import ExitCode
from CTNeRFReconLib.methods import RunContext
from CTNeRFReconLib.nerf.config import NerfConfig
from CTNeRFReconLib.nerf.train import NerfTrainer, TimeBudget

from nerf_case import small_phantom_case
from worker_case import run_cli, write_small_case


def test_the_trainer_ends_within_its_time_limit_with_a_complete_schedule():
    scan, ref = small_phantom_case(views=12, det=32, n=24)
    limit = 20.0  # the set-up (rays, support, kernels) counts too; generous for a machine shared with other jobs
    messages = []
    settings = dict(preset="preview", iterations=100000, rays_start=2048, rays_end=4096, snapshot_every=0,
                    eval_every=10, checkpoint_every=0, time_limit_s=limit, iterations_cap=100000)
    start = time.perf_counter()
    ctx = RunContext(device="cpu", settings=settings, on_message=messages.append, clock_start=start)
    trainer = NerfTrainer(scan, ref.grid, NerfConfig.from_settings(settings), ctx)
    trainer.run()
    took = time.perf_counter() - start
    budget = ctx.report["time_budget"]
    assert took < limit + 3.0, (took, budget)
    assert budget["iterations_planned"] < 100000 and budget["iterations_done"] >= 10
    # a planned schedule, re-planned as it went: it ran to (almost) its planned end, its lr decayed
    assert budget["iterations_done"] >= 0.9 * budget["iterations_planned"], budget
    assert trainer.lr_factor(budget["iterations_done"] - 1) < 0.2
    assert any("time limit" in m for m in messages)


def test_the_plan_follows_the_rate_and_respects_the_cap():
    now = time.perf_counter()
    b = TimeBudget(100.0, now - 10.0, 0, 2000, 3000)
    b.export_s = 0.0
    for it in range(1, 20):
        b._samples.append((it, now - 0.01 * (20 - it)))  # 100 it/s
    planned = b.observe(20, lambda: None)
    assert planned == 3000  # ~8500 fit; capped
    b2 = TimeBudget(30.0, now - 10.0, 0, 2000, 8000)
    b2.export_s = 0.0
    for it in range(1, 20):
        b2._samples.append((it, now - 0.5 * (20 - it)))  # 2 it/s, ~18 s left after the reserve
    planned = b2.observe(20, lambda: None)
    assert 20 + 30 <= planned <= 20 + 40, planned


def test_the_command_line_takes_a_time_limit_and_reports_it(tmp_path):
    case = write_small_case(tmp_path / "data")
    out = tmp_path / "run"
    res = run_cli("reconstruct", case, "--out", out, "--time-limit", "12", "--preset", "preview",
                  "--snapshot-every", "0", timeout=240)
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    budget = run["method_report"]["time_budget"]
    assert budget["limit_s"] == 12 and budget["iterations_done"] > 0
    assert run["settings"]["time_limit_s"] == 12
    assert run["elapsed_s"] < 12 + 4
    assert "support" in run["method_report"]
    # nerf only, and a positive number
    bad = run_cli("reconstruct", case, "--out", tmp_path / "r2", "--method", "fdk", "--time-limit", "5")
    assert bad.returncode == ExitCode.BAD_INPUT and "--time-limit" in bad.stderr
    bad = run_cli("reconstruct", case, "--out", tmp_path / "r3", "--time-limit", "0")
    assert bad.returncode == ExitCode.BAD_INPUT and "--time-limit" in bad.stderr


def test_the_time_limit_chooses_the_voxel_the_support_sets(tmp_path, monkeypatch):
    """`voxel_from_time_limit`: where the cap on the field of view's box coarsened the training voxel, a
    timed run starts at that voxel and, once it has measured its rate, starts again at the voxel the
    support sets when that rate buys enough iterations there, all within the one limit; otherwise it goes on.
    The set-up lines are said once either way. A resumed run keeps its checkpoint's voxel; with the
    setting off the preset decides. (The threshold is scaled down to this tiny case's iteration counts.)"""
    from dataclasses import replace

    from CTNeRFReconLib.fov import default_grid
    from CTNeRFReconLib.nerf.method import NerfMethod, voxel_for_time_limit
    from CTNeRFReconLib.nerf.train import carve_support

    scan, _ = small_phantom_case(views=12, det=32, n=24)
    out = default_grid(scan.geometry)
    cap = out.n_voxels // 4
    coarse = carve_support(scan, out, NerfConfig(max_training_voxels=cap))[1]
    finer = carve_support(scan, out, NerfConfig(max_training_voxels=cap, support_sets_voxel=True))[1]
    assert min(finer.spacing_xyz) < 0.95 * min(coarse.spacing_xyz)  # the case has a finer voxel to choose
    limit = 8.0
    settings = dict(preset="preview", iterations=100000, iterations_cap=100000, rays_start=1024, rays_end=2048,
                    snapshot_every=0, eval_every=10, checkpoint_every=0, time_limit_s=limit,
                    max_training_voxels=cap)

    def timed(run_dir, needed, resume=False, **extra):
        monkeypatch.setattr(NerfTrainer, "FINER_VOXEL_CHOSEN_FROM", needed)
        messages = []
        ctx = RunContext(device="cpu", settings=dict(settings, **extra), on_message=messages.append,
                         run_dir=run_dir, resume=resume)
        start = time.perf_counter()
        if resume:
            NerfMethod().check_resume(scan, out, ctx)
        volume = NerfMethod().reconstruct(scan, out, ctx)
        assert volume.grid.to_dict() == out.to_dict() and volume.array.max() > 0
        return ctx, messages, time.perf_counter() - start

    for needed, chosen in ((20, finer), (10 ** 9, coarse)):
        run_dir = tmp_path / f"run_{needed}"
        run_dir.mkdir()
        ctx, messages, took = timed(run_dir, needed)
        choice = ctx.report["voxel_from_time_limit"]
        assert ctx.report["support"]["training_grid_shape_xyz"] == list(chosen.shape_xyz), choice
        # the voxel predicted before the counts round (a few per cent on this tiny grid)
        assert choice["chosen_mm"] == pytest.approx(min(chosen.spacing_xyz), rel=0.1)
        assert choice["iterations_there"] < choice["iterations_here"]  # the finer voxel costs more per iteration
        # the threshold follows the training views: the count at 25 views times 25 / views, at least half of it
        assert choice["iterations_needed"] == max(needed // 2, round(needed * 25 / choice["views_counted"]))
        assert choice["views_counted"] <= choice["views"]
        assert 0 < choice["views"] <= scan.n_views
        assert (choice["iterations_there"] >= choice["iterations_needed"]) == (chosen is finer)
        assert took < limit + 3.0, (took, ctx.report["time_budget"])
        assert sum("object support carved" in m for m in messages) == 1, messages
        assert any(("training there" if chosen is finer else "staying at") in m for m in messages), messages
        # resumed with a time limit: the checkpoint's voxel, nothing chosen again
        ctx, _, _ = timed(run_dir, 20 if chosen is coarse else 10 ** 9, resume=True, time_limit_s=4.0)
        assert ctx.report["support"]["training_grid_shape_xyz"] == list(chosen.shape_xyz)
        assert "voxel_from_time_limit" not in ctx.report
    # the setting off, or no time limit: the preset decides
    for extra in (dict(voxel_from_time_limit=False), dict(time_limit_s=None), dict(support=False)):
        cfg = NerfConfig.from_settings(dict(settings, preset="high", **extra))
        assert voxel_for_time_limit(cfg) == (cfg, False)
    high = NerfConfig.from_settings(dict(settings, preset="high"))
    assert voxel_for_time_limit(high) == (replace(high, support_sets_voxel=False), True)


def test_the_finer_voxel_pays_sooner_with_more_views():
    """The iterations the finer voxel needs to pay (measured at 25 views of about 1e5 photons per ray) scale
    inversely with the views, counted down where the air's noise says fewer photons (never up), and never
    fall below their value at 50 views, the most measured (docs/nerf.md, "The break-even follows the
    views")."""
    from types import SimpleNamespace

    def trainer(views, air_variance):
        t = SimpleNamespace(n_train_views=views, air_noise_variance=air_variance,
                            FINER_VOXEL_VIEWS=NerfTrainer.FINER_VOXEL_VIEWS,
                            FINER_VOXEL_PHOTONS=NerfTrainer.FINER_VOXEL_PHOTONS)
        t._photons_per_ray = lambda: NerfTrainer._photons_per_ray(t)
        t._finer_voxel_views = lambda: NerfTrainer._finer_voxel_views(t)
        return t

    def needs(views, at_25=1000, air_variance=1e-5):
        return NerfTrainer._finer_voxel_iterations(trainer(views, air_variance), at_25)

    assert [needs(v) for v in (10, 25, 40, 50, 100)] == [2500, 1000, 625, 500, 500]
    assert needs(50, 800) == 400 and needs(200, 800) == 400
    assert needs(50, air_variance=None) == 500  # no air to measure the noise in: the views alone
    assert needs(50, air_variance=1e-6) == 500  # more photons than measured: not counted up
    assert needs(50, air_variance=1.02e-5) == 500  # I0 1e5 as the air's noise measured it on the benchmark cases
    assert needs(50, air_variance=1e-4) == 4500 and needs(100, air_variance=1e-4) == 2250  # I0 1e4: 1e4 / 9e4
    assert NerfTrainer._finer_voxel_scan(trainer(50, 1e-4)) == "50 views of about 1e+04 photons per ray"
    assert NerfTrainer._finer_voxel_scan(trainer(50, 1e-5)) == "50 views"
