#!/usr/bin/env python3
"""Cancel, stop and scene close through a launcher that forwards no signals: is the engine gone?

Every trial starts a real engine (nerf on a tiny case, CPU, 100000 iterations with a snapshot every
2, so a lost cancel would run for hours) under Testing/fake_launcher.py, which behaves like Slicer's
PythonSlicer (CTK AppLauncher: the real Python is its child, no signal is forwarded, SIGTERM ends
the launcher alone). Scenarios:

* ``cancel-after-start``: ReconstructionSession.cancel() once the first snapshot arrived, then polling;
* ``cancel-before-start``: cancel() at a random moment between the start and ~the engine's
  ``started`` (before the engine process exists, while it imports, while it loads the data);
* ``stop``: WorkerProcess.stop() (blocking) once the first snapshot arrived;
* ``scene-close``: closing a real vtkMRMLScene (slicer-core) that a running session observes.

For each: how many trials had the engine's process (the ``started`` pid, or the launcher's
child) gone within 10 s of the request, the longest and median time to gone, how many runs had
started, and how many of those left a complete, readable volume.nrrd on the run's grid. A trial
whose engine outlives 10 s is counted as such and then killed. Prints a table, writes JSON.

    python benchmarks/bench_cancel.py --trials 20 --out benchmarks/results/cancel
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from fake_launcher import find_engine_child, write_launcher  # noqa: E402

from CTNeRFReconLib.slicer_bridge.session import ReconstructionSession, SessionOptions  # noqa: E402
from CTNeRFReconLib.slicer_bridge.worker import ReconstructRequest, WorkerConfig, WorkerProcess  # noqa: E402

SCENARIOS = ("cancel-after-start", "cancel-before-start", "stop", "scene-close")
GONE_S = 10.0


def write_case(folder: Path) -> Path:
    """The tiny case of Testing/test_launcher_cancel.py: 12 views of 24 x 24, a 24^3 grid."""
    sys.path.insert(0, str(REPO / "Testing"))
    from test_launcher_cancel import write_case as write

    return write(folder)


def is_gone(proc) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def seconds_to_gone(proc, since: float, limit: float = GONE_S) -> float | None:
    while not is_gone(proc):
        if time.monotonic() - since > limit:
            return None
        time.sleep(0.02)
    return time.monotonic() - since


def complete_volume(run: Path) -> bool:
    from CTNeRFReconLib.volume_io import read_volume

    try:
        started = next(e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines())
                       if e["event"] == "started")
        volume = read_volume(run / "volume.nrrd")
        return (list(volume.grid.shape_xyz) == list(started["grid"]["shape_xyz"])
                and bool(np.all(np.isfinite(volume.array))) and float(volume.array.max()) > 0)
    except (OSError, ValueError, StopIteration, RuntimeError, KeyError):
        return False


def engine_child(worker: WorkerProcess, timeout: float = 60.0):
    return find_engine_child(worker.pid, timeout, interval=0.005)


def trial(scenario: str, case: Path, root: Path, launcher: Path, rng: random.Random, cancel_grace: float) -> dict:
    import slicer

    run = root / "run"
    request = ReconstructRequest(data=case, out=run, method="nerf", device="cpu", preset="preview",
                                 iterations=100000, snapshot_every=2)
    config = WorkerConfig(interpreter=str(launcher), cancel_grace_s=cancel_grace, terminate_grace_s=8.0)
    scene = slicer.vtkMRMLScene()
    session = ReconstructionSession(scene, request, config, SessionOptions(name="bench", close_timeout_s=30))
    row = {"scenario": scenario}
    t_start = time.monotonic()
    session.start()
    worker = session.worker
    engine = None
    try:
        if scenario == "cancel-before-start":
            delay = rng.uniform(0.0, 1.2)
            while time.monotonic() - t_start < delay and session.started_info is None:
                session.poll()
                time.sleep(0.005)
            row["delay_s"] = round(delay, 3)
            child = None
            try:
                kids = psutil.Process(worker.pid).children()
                child = next((k for k in kids if "CTNeRFReconLib" in k.cmdline()), None)
            except psutil.Error:
                pass
            row["engine_existed"] = child is not None
            row["started_before_cancel"] = session.started_info is not None
            t0 = time.monotonic()
            session.cancel()
            engine = child or engine_child(worker, timeout=GONE_S)
        else:
            deadline = time.monotonic() + 180
            while session.volumes_applied == 0 and not session.state.done and time.monotonic() < deadline:
                session.poll()
                time.sleep(0.01)
            engine = psutil.Process(session.started_info["pid"])
            t0 = time.monotonic()
            if scenario == "cancel-after-start":
                session.cancel()
            elif scenario == "stop":
                worker.stop(timeout=30)
            else:
                scene.Clear(0)
        # the client goes on polling as a GUI timer would (a no-op after stop and close)
        while not session.state.done and time.monotonic() - t0 < GONE_S:
            session.poll()
            if engine is None:
                engine = engine_child(worker, timeout=0.0)
            time.sleep(0.02)
        gone = None if engine is None else seconds_to_gone(engine, t0)
        if engine is None and not worker.alive():  # the launcher ended before it started an engine
            gone = time.monotonic() - t0
        row.update(gone=gone is not None, seconds_to_gone=None if gone is None else round(gone, 3))
        session.wait(5)
    finally:
        worker.wait(10)  # the launcher exits just after the engine; only what outlives that is killed
        if worker.alive():
            worker.kill_tree()
        if engine is not None and not is_gone(engine):
            engine.kill()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()] \
        if (run / "events.jsonl").exists() else []
    started = any(e["event"] == "started" for e in events)
    last = events[-1] if events else {}
    row.update(started=started, complete_volume=started and complete_volume(run),
               ended=last.get("event"), cancelled=bool(last.get("cancelled")), killed=worker.killed,
               exit_code=worker.process.returncode, state=session.state.value)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for scenario in SCENARIOS:
        rs = [r for r in rows if r["scenario"] == scenario]
        if not rs:
            continue
        times = [r["seconds_to_gone"] for r in rs if r["seconds_to_gone"] is not None]
        started = [r for r in rs if r["started"]]
        table.append({"scenario": scenario, "trials": len(rs), "engine_gone_10s": sum(r["gone"] for r in rs),
                      "max_s_to_gone": max(times) if times else None,
                      "median_s_to_gone": round(statistics.median(times), 3) if times else None,
                      "started": len(started), "complete_volumes": sum(r["complete_volume"] for r in started),
                      "killed": sum(r["killed"] for r in rs)})
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="trials per scenario (default 20)")
    ap.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    ap.add_argument("--cancel-grace", type=float, default=0.5,
                    help="WorkerConfig.cancel_grace_s: seconds from the cancel file to SIGTERM (default 0.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cancel")
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cancel_") as tmp:
        tmp = Path(tmp)
        case = write_case(tmp / "case")
        launcher = write_launcher(tmp / "launcher")
        for i in range(a.trials):
            for scenario in a.scenarios:
                root = tmp / f"{scenario}-{i}"
                root.mkdir()
                rows.append(trial(scenario, case, root, launcher, rng, a.cancel_grace))
                print(json.dumps(rows[-1]), flush=True)
    table = summarise(rows)
    head = f"{'scenario':<20} {'trials':>6} {'gone<=10s':>9} {'max s':>7} {'median s':>8} {'started':>7} " \
           f"{'complete vol':>12} {'killed':>6}"
    print("\n" + head + "\n" + "-" * len(head))
    for t in table:
        print(f"{t['scenario']:<20} {t['trials']:>6} {t['engine_gone_10s']:>9} "
              f"{t['max_s_to_gone'] if t['max_s_to_gone'] is not None else '-':>7} "
              f"{t['median_s_to_gone'] if t['median_s_to_gone'] is not None else '-':>8} {t['started']:>7} "
              f"{t['complete_volumes']:>12} {t['killed']:>6}")
    a.out.mkdir(parents=True, exist_ok=True)
    info = {"bench": "cancel", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "platform": platform.platform(), "python": platform.python_version(), "cpus": psutil.cpu_count(),
            "launcher": "Testing/fake_launcher.py (forwarded channels, no signal forwarding)",
            "case": "nerf, 12 views of 24x24, 24^3 grid, cpu, snapshot every 2 iterations",
            "cancel_grace_s": a.cancel_grace, "terminate_grace_s": 8.0, "gone_limit_s": GONE_S,
            "trials": a.trials, "seed": a.seed, "summary": table, "results": rows}
    path = a.out / "results.json"
    path.write_text(json.dumps(info, indent=1))
    print(f"\nwrote {path}")
    return 0 if all(t["engine_gone_10s"] == t["trials"] for t in table) else 1


if __name__ == "__main__":
    sys.exit(main())
