"""Cancel and stop reach the engine through a launcher that forwards no signals (Slicer's PythonSlicer).

The engine runs under Testing/fake_launcher.py, which behaves like CTK's AppLauncher: the real
Python is its child, SIGTERM ends the launcher alone and leaves the child running, and the
launcher exits with the child's exit code. Each case checks that the engine's own process (its
pid from the ``started`` event, or psutil's child of the launcher before that) is gone within
10 s, and that the run folder holds a complete, readable volume.nrrd whenever the run had started.
Cases: a cancel before ``started``, a cancel after it (launcher with forwarded and with relayed
output), WorkerProcess.stop(), closing a real vtkMRMLScene, the exit of the Python that started
the worker (atexit), a cancel after the launcher itself died; and the engine's stale-cancel rule.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

psutil = pytest.importorskip("psutil")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fake_launcher import find_engine_child, write_launcher  # noqa: E402

from CTNeRFReconLib.methods import method_names  # noqa: E402
from CTNeRFReconLib.rundir import RunFolder  # noqa: E402
from CTNeRFReconLib.slicer_bridge.worker import (  # noqa: E402
    ReconstructRequest, WorkerConfig, WorkerProcess, worker_environment)

GONE_S = 10.0
"""The engine's process must be gone this long after the cancel (or the stop, the close, the exit)."""

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals (the launcher is killed with SIGKILL)")


def _have(method: str) -> bool:
    try:
        return method in method_names()
    except ImportError:
        return False


needs_nerf = pytest.mark.skipif(not _have("nerf"), reason="the engine's nerf method is not available")
needs_fdk = pytest.mark.skipif(not _have("fdk"), reason="the engine's fdk method is not available")


def write_case(folder: Path) -> Path:
    """A tiny RTK case: 12 views of 24 x 24 of an ellipsoid (a 24^3 output grid)."""
    from CTNeRFReconLib.data import ScanData
    from CTNeRFReconLib.formats.rtk import write_rtk_case
    from CTNeRFReconLib.geometry import circular_geometry
    from CTNeRFReconLib.phantom import Ellipsoid, phantom_line_integrals
    from CTNeRFReconLib.rays import all_pixel_indices, view_rays

    views, det = 12, 24
    geometry = circular_geometry(300.0, 450.0, np.radians(np.arange(views) * 360.0 / views), (det, det),
                                 (9.0, 9.0), axis="y")
    v, r, c = all_pixel_indices(geometry)
    rays = view_rays(geometry, v, r, c, np.full(3, -1000.0), np.full(3, 1000.0))
    body = [Ellipsoid((0.0, 0.0, 0.0), (50.0, 50.0, 40.0), 0.02), Ellipsoid((15.0, -10.0, 5.0), (9, 11, 8), 0.04)]
    p = phantom_line_integrals(body, rays.origins.double().numpy(), rays.directions.double().numpy())
    scan = ScanData(p.reshape(views, det, det).astype(np.float32), geometry, "synthetic", "<launcher test>")
    write_rtk_case(scan, folder)
    return folder


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    return write_case(tmp_path_factory.mktemp("launcher_case"))


def nerf_request(case: Path, out: Path) -> ReconstructRequest:
    """A nerf run that would go on for hours, with a snapshot every 2 iterations."""
    return ReconstructRequest(data=case, out=out, method="nerf", device="cpu", preset="preview",
                              iterations=100000, snapshot_every=2)


def fdk_request(case: Path, out: Path) -> ReconstructRequest:
    return ReconstructRequest(data=case, out=out, method="fdk", device="cpu", preset="preview")


def launcher_config(tmp_path: Path, relay: bool = False, **kwargs) -> WorkerConfig:
    return WorkerConfig(interpreter=str(write_launcher(tmp_path / "launcher", relay=relay)), **kwargs)


def is_gone(proc) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def gone_within(proc, seconds: float, since: float) -> float | None:
    """Seconds from ``since`` until ``proc`` was gone, or None if it still ran ``seconds`` after ``since``."""
    while not is_gone(proc):
        if time.monotonic() - since > seconds:
            return None
        time.sleep(0.05)
    return time.monotonic() - since


def engine_child(worker: WorkerProcess, timeout: float = 60.0):
    """The launcher's child that runs the engine (before ``started``)."""
    child = find_engine_child(worker.pid, timeout, interval=0.01)
    if child is None:
        raise AssertionError("the launcher started no engine process")
    return child


def started_pid(events: list[dict]) -> int | None:
    return next((e["pid"] for e in events if e.get("event") == "started"), None)


def assert_complete_volume(run: Path):
    """volume.nrrd is there, readable, finite, on the run's grid (the started event's)."""
    from CTNeRFReconLib.volume_io import read_volume

    started = next(json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()
                   if json.loads(line)["event"] == "started")
    volume = read_volume(run / "volume.nrrd")
    assert list(volume.grid.shape_xyz) == list(started["grid"]["shape_xyz"])
    assert np.all(np.isfinite(volume.array)) and volume.array.max() > 0


def poll_until(worker: WorkerProcess, events: list, condition, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += worker.poll()
        if condition(events):
            return events
        if any(e["event"] in ("finished", "failed") for e in events):
            break
        time.sleep(0.02)
    raise AssertionError(f"condition not met; events: {[e['event'] for e in events]}; log: {list(worker.log)[-5:]}")


def wait_for_first_volume(session, timeout: float = 180.0):
    """Poll a ReconstructionSession until it has put a volume into the scene (or ended)."""
    deadline = time.monotonic() + timeout
    while session.volumes_applied == 0 and not session.state.done and time.monotonic() < deadline:
        session.poll()
        time.sleep(0.02)
    assert session.volumes_applied >= 1, session.message


def first_snapshot(events):
    return any(e["event"] == "snapshot" for e in events)


# ------------------------------------------------------------------------------------- engine

def test_the_engine_removes_only_a_cancel_file_older_than_its_run(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    began = folder.clock()
    folder.cancel_file.touch()
    folder.remove_stale_cancel(older_than=began)
    assert folder.cancel_file.exists()  # made since the run began: this run's own cancel
    os.utime(folder.cancel_file, (began - 60, began - 60))
    folder.remove_stale_cancel(older_than=began)
    assert not folder.cancel_file.exists()  # left from an earlier run


# ---------------------------------------------------------------------------- through a launcher

@needs_fdk
def test_a_cancel_before_started_reaches_the_engine(case, tmp_path):
    """Old behaviour: SIGTERM ended the launcher only, the engine removed the cancel file as stale
    and finished the run as if nobody had asked."""
    from CTNeRFReconLib.slicer_bridge.session import ReconstructionSession, SessionState

    scene = pytest.importorskip("slicer").vtkMRMLScene()
    run = tmp_path / "run"
    session = ReconstructionSession(scene, fdk_request(case, run), launcher_config(tmp_path)).start()
    engine = engine_child(session.worker)
    session.poll()
    assert session.started_info is None  # still starting
    t0 = time.monotonic()
    session.cancel()
    assert session.wait(60) is SessionState.CANCELLED, (session.state, session.message)
    assert gone_within(engine, GONE_S, t0) is not None
    assert session.failure_kind is None
    if session.started_info is not None:  # it got as far as running: its folder is complete
        assert session.finished_info["cancelled"] is True
        assert_complete_volume(run)


@needs_nerf
@pytest.mark.parametrize("relay", [False, True], ids=["forwarded", "relayed"])
def test_a_cancel_after_started_signals_the_engine_not_the_launcher(case, tmp_path, relay):
    """cancel_grace_s=0: the SIGTERM step at once. Old behaviour: the launcher got it and died (exit
    -15; a relaying launcher took the engine's output with it, and the run ended without a volume)."""
    from CTNeRFReconLib.slicer_bridge.session import ReconstructionSession, SessionState

    scene = pytest.importorskip("slicer").vtkMRMLScene()
    run = tmp_path / "run"
    session = ReconstructionSession(scene, nerf_request(case, run),
                                    launcher_config(tmp_path, relay, cancel_grace_s=0, terminate_grace_s=30)).start()
    wait_for_first_volume(session)
    engine = psutil.Process(session.started_info["pid"])
    assert engine.pid != session.worker.pid  # the engine is the launcher's child
    t0 = time.monotonic()
    session.cancel()
    assert session.wait(60) is SessionState.CANCELLED, session.message
    assert gone_within(engine, GONE_S, t0) is not None
    assert session.finished_info is not None and session.finished_info["cancelled"] is True
    assert session.worker.wait(30) == 0 and not session.worker.killed  # the launcher passed on a clean exit
    assert_complete_volume(run)


@needs_nerf
def test_stop_waits_for_the_engine_and_lets_it_finish(case, tmp_path):
    """Old behaviour: stop() sent SIGTERM to the launcher, saw it exit and SIGKILLed the process
    group, engine included, before it could write its volume."""
    run = tmp_path / "run"
    worker = WorkerProcess.reconstruct(nerf_request(case, run),
                                       launcher_config(tmp_path, cancel_grace_s=0, terminate_grace_s=30)).start()
    events = poll_until(worker, [], first_snapshot)
    engine = psutil.Process(started_pid(events))
    t0 = time.monotonic()
    worker.stop(timeout=40)
    assert is_gone(engine), "stop() returned while the engine still ran"
    assert time.monotonic() - t0 < GONE_S
    events += worker.poll()
    assert events[-1]["event"] == "finished" and events[-1]["cancelled"] is True, events[-1]
    assert not worker.killed
    assert_complete_volume(run)


@needs_nerf
def test_closing_the_scene_stops_the_engine_cleanly(case, tmp_path):
    from CTNeRFReconLib.slicer_bridge.session import ReconstructionSession, SessionOptions, SessionState

    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    run = tmp_path / "run"
    session = ReconstructionSession(scene, nerf_request(case, run),
                                    launcher_config(tmp_path, cancel_grace_s=0, terminate_grace_s=30),
                                    SessionOptions(name="recon", close_timeout_s=40)).start()
    wait_for_first_volume(session)
    engine = psutil.Process(session.started_info["pid"])
    t0 = time.monotonic()
    scene.Clear(0)  # File > Close Scene: the session stops the worker (blocking)
    assert session.state is SessionState.CANCELLED, session.message
    assert gone_within(engine, GONE_S, t0) is not None
    assert any(e["event"] == "finished" and e["cancelled"] for e in session.events)
    assert not session.worker.killed
    assert_complete_volume(run)


@needs_nerf
def test_the_engine_is_stopped_when_the_python_that_started_it_exits(case, tmp_path):
    """Closing Slicer: atexit's stop_all_workers ends the engine, not only the launcher."""
    run = tmp_path / "run"
    launcher = write_launcher(tmp_path / "launcher")
    script = f"""
import json, time
from pathlib import Path
from CTNeRFReconLib.slicer_bridge.worker import ReconstructRequest, WorkerConfig, WorkerProcess
request = ReconstructRequest(data=Path({str(case)!r}), out=Path({str(run)!r}), method="nerf", device="cpu",
                             preset="preview", iterations=100000, snapshot_every=2)
config = WorkerConfig(interpreter={str(launcher)!r}, cancel_grace_s=0, terminate_grace_s=30, exit_timeout_s=40)
worker = WorkerProcess.reconstruct(request, config).start()
events, deadline = [], time.monotonic() + 180
while time.monotonic() < deadline and not any(e["event"] == "snapshot" for e in events):
    events += worker.poll()
    time.sleep(0.02)
print(json.dumps({{"pid": next(e["pid"] for e in events if e["event"] == "started")}}), flush=True)
"""  # ends without stopping its worker
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=worker_environment())
    line = child.stdout.readline()
    assert line, child.stderr.read()
    engine = psutil.Process(json.loads(line)["pid"])
    t0 = time.monotonic()  # the script is at its end: the interpreter exits now
    assert child.wait(60) == 0, child.stderr.read()
    assert gone_within(engine, GONE_S, t0) is not None
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "finished" and events[-1]["cancelled"] is True
    assert_complete_volume(run)


@needs_nerf
def test_a_cancel_after_the_launcher_died_still_stops_the_engine(case, tmp_path):
    """The launcher gone (crashed, killed), the engine orphaned: the worker still runs and a cancel
    still works. Old behaviour: the cancel was ignored, since the launcher had exited."""
    run = tmp_path / "run"
    worker = WorkerProcess.reconstruct(nerf_request(case, run), launcher_config(tmp_path)).start()
    events = poll_until(worker, [], first_snapshot)
    engine = psutil.Process(started_pid(events))
    os.kill(worker.pid, signal.SIGKILL)
    worker.process.wait(10)
    assert not is_gone(engine)  # an orphan now
    t0 = time.monotonic()
    worker.request_cancel()
    events = poll_until(worker, events, lambda ev: ev[-1]["event"] in ("finished", "failed"), timeout=60)
    assert events[-1]["event"] == "finished" and events[-1]["cancelled"] is True, events[-1]
    assert gone_within(engine, GONE_S, t0) is not None
    assert_complete_volume(run)


# ------------------------------------------------------------------- a fork is not a launcher's engine

def write_forking_engine(folder: Path) -> Path:
    """A stand-in engine run straight (no launcher) that forks a child and never execs it, as the
    engine does when it starts its image reader: until the child execs, its command line is the
    engine's own. The child writes `child-sigterm` when it gets SIGTERM; `forked` says it exists."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ForkingPython"
    path.write_text(f"#!{sys.executable}\n"
                    "import os, signal, sys, time\n"
                    "here = os.path.dirname(os.path.abspath(__file__))\n"
                    "if os.fork() == 0:\n"
                    "    def got(*_):\n"
                    "        open(os.path.join(here, 'child-sigterm'), 'w').close()\n"
                    "        os._exit(0)\n"
                    "    signal.signal(signal.SIGTERM, got)\n"
                    "    time.sleep(60)\n"
                    "    os._exit(0)\n"
                    "open(os.path.join(here, 'forked'), 'w').close()\n"
                    "time.sleep(60)\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | 0o111)
    return path


def test_an_early_cancel_never_signals_a_fork_of_the_engine(case, tmp_path):
    """Old behaviour: before `started`, the forked child (same command line as the engine, ending in
    `-m CTNeRFReconLib ARGS`) was taken for an engine under a launcher and got the cancel's SIGTERM: in
    the real engine that child is the image reader, and the user's projections were then reported as
    corrupt. The cancel must reach the started process itself (after the grace) and leave the fork be."""
    folder = tmp_path / "engine"
    config = WorkerConfig(interpreter=str(write_forking_engine(folder)), cancel_grace_s=1.0, terminate_grace_s=5)
    worker = WorkerProcess.reconstruct(fdk_request(case, tmp_path / "run"), config).start()
    fork = None
    try:
        deadline = time.monotonic() + 30
        while not (folder / "forked").exists():
            assert time.monotonic() < deadline, "the stand-in engine did not fork"
            time.sleep(0.01)
        fork = psutil.Process(worker.pid).children()[0]
        assert fork.cmdline() == psutil.Process(worker.pid).cmdline()  # the race being staged
        worker.request_cancel()
        root = psutil.Process(worker.pid)
        t0 = time.monotonic()
        while not is_gone(root) and time.monotonic() - t0 < 10:
            worker.poll()
            time.sleep(0.02)
        assert is_gone(root), "the cancel did not stop the started process"
        assert not (folder / "child-sigterm").exists(), "the cancel's SIGTERM went to the engine's fork"
    finally:
        worker.stop(timeout=5)
        if fork is not None and not is_gone(fork):
            fork.kill()
