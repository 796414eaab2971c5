"""--time-limit: the schedule is planned from the measured rate so the run ends in time, and says so."""
from __future__ import annotations

import json
import time

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
