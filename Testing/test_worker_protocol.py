"""The worker protocol of DESIGN.md, through real `python -m CTNeRFReconLib reconstruct` subprocesses.

Checks: JSON lines with protocol 1 in the order started -> progress* -> snapshot* -> finished;
events.jsonl equal to stdout; snapshots never torn while a reader polls them; SIGTERM and the
cancel file end a run cleanly (cancelled, complete volume, exit 0) and --resume continues it;
a finished run folder is kept without --overwrite; bad input is a lone `failed` event, exit 2,
no traceback, nothing written but events.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from CTNeRFReconLib.events import ExitCode
from CTNeRFReconLib.volume_io import read_volume

from worker_case import parse_events, popen_cli, run_cli, write_small_case, write_with_bad_voxel


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_small_case(tmp_path_factory.mktemp("case") / "data")


def check_order(events: list[dict]):
    """protocol 1 on every event, started first, one terminal event last, only progress/snapshot/residuals
    between (each residuals right after a snapshot; at most one projection_check, just before `finished`)."""
    assert events, "no events"
    for e in events:
        assert e["protocol"] == 1 and isinstance(e["time"], float) and "event" in e
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started"
    assert kinds[-1] in ("finished", "failed")
    assert set(kinds[1:-1]) <= {"progress", "snapshot", "residuals", "projection_check"}, kinds
    assert all(kinds[i - 1] == "snapshot" for i, kind in enumerate(kinds) if kind == "residuals"), kinds
    assert kinds.count("projection_check") <= 1 and "projection_check" not in kinds[1:-2], kinds  # just before the end


def test_fdk_run_writes_a_complete_run_folder(case, tmp_path):
    run = tmp_path / "run"
    res = run_cli("reconstruct", case, "--out", run, "--method", "fdk", "--reference", case / "reference.nrrd")
    assert res.returncode == ExitCode.OK, res.stderr
    events = parse_events(res.stdout)
    check_order(events)
    assert (run / "events.jsonl").read_text() == res.stdout
    started, finished = events[0], events[-1]
    assert started["views"] == 24 and started["detector"]["rows"] == 48 and started["device"] == "cpu"
    assert started["grid"]["source"] == "reference"
    assert finished["event"] == "finished" and finished["cancelled"] is False
    volume = read_volume(finished["paths"]["volume"])
    reference = read_volume(case / "reference.nrrd")
    assert volume.grid.shape_xyz == tuple(started["grid"]["shape_xyz"]) == reference.grid.shape_xyz
    assert np.allclose(volume.grid.origin_xyz, reference.grid.origin_xyz)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == finished["metrics"]
    assert metrics["psnr"] > 18, metrics  # FDK of 24 noisy views of the phantom, measured ~22 dB
    for key in ("preview", "projections_preview", "run"):
        assert (run / finished["paths"][key]).stat().st_size > 0
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["method"] == "fdk" and info["versions"]["torch"]
    # OpenMP threads sleep between loops unless the user chose otherwise (cli._passive_openmp_threads)
    assert info["versions"]["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def test_finished_run_is_kept_without_overwrite(case, tmp_path):
    run = tmp_path / "run"
    assert run_cli("reconstruct", case, "--out", run, "--method", "fdk").returncode == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()}
    again = run_cli("reconstruct", case, "--out", run, "--method", "fdk")
    assert again.returncode == ExitCode.BAD_INPUT
    (failed,) = parse_events(again.stdout)
    assert failed["event"] == "failed" and failed["kind"] == "bad_input" and "--overwrite" in failed["message"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()} == before
    # an HU reference (auto-detected) scores like the same reference in 1/mm
    ref = sitk.ReadImage(str(case / "reference.nrrd"))
    hu = sitk.Cast((ref / 0.02 - 1.0) * 1000.0, sitk.sitkFloat32)
    sitk.WriteImage(hu, str(tmp_path / "reference_hu.nrrd"))
    over = run_cli("reconstruct", case, "--out", run, "--method", "fdk", "--overwrite",
                   "--reference", tmp_path / "reference_hu.nrrd")
    assert over.returncode == 0, over.stderr
    events = parse_events(over.stdout)
    check_order(events)
    assert (run / "events.jsonl").read_text() == over.stdout  # a new run starts a new log
    assert events[0]["reference"]["units"] == "hu"
    mu = run_cli("reconstruct", case, "--out", tmp_path / "run_mu", "--method", "fdk",
                 "--reference", case / "reference.nrrd", "--reference-units", "mu")
    assert parse_events(mu.stdout)[-1]["metrics"]["psnr"] == pytest.approx(events[-1]["metrics"]["psnr"], abs=0.05)


def _refused(res, run):
    assert res.returncode == ExitCode.BAD_INPUT, res.stderr
    (failed,) = parse_events(res.stdout)
    assert failed["event"] == "failed" and failed["kind"] == "bad_input" and failed["protocol"] == 1
    assert "Traceback" not in res.stderr
    assert failed["message"] and "\n" not in failed["message"]
    if run.exists():
        assert sorted(p.name for p in run.iterdir()) == ["events.jsonl"]
        assert (run / "events.jsonl").read_text() == res.stdout
    return failed


def test_bad_input_is_refused_before_any_work(case, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "geometry.xml").write_bytes((case / "geometry.xml").read_bytes())
    # a fifth of a view without values: broken data, not a panel's dead pixels
    write_with_bad_voxel(case / "projections.mha", bad / "projections.mha", (3, slice(0, 10)), np.nan)
    failed = _refused(run_cli("reconstruct", bad, "--out", tmp_path / "run_nan", "--method", "fdk"), tmp_path / "run_nan")
    assert "projections" in failed["message"]
    _refused(run_cli("reconstruct", tmp_path / "missing", "--out", tmp_path / "run_missing"), tmp_path / "run_missing")
    _refused(run_cli("reconstruct", case, "--out", tmp_path / "run_grid", "--grid-size", "0", "4", "4"),
             tmp_path / "run_grid")
    _refused(run_cli("reconstruct", case, "--out", tmp_path / "run_method", "--method", "nope"),
             tmp_path / "run_method")
    failed = _refused(run_cli("reconstruct", case, "--out", tmp_path / "run_argv", "--iterations", "many"),
                      tmp_path / "run_argv")
    assert "--iterations" in failed["message"]


def test_fdk_filter_options(case, tmp_path):
    """--fdk-filter / --fdk-cutoff reach FDK (the volume is the library's with that window), and are
    refused before any work with another method or an unknown window."""
    from CTNeRFReconLib.fdk import FDKConfig, fdk
    from CTNeRFReconLib.formats import load_scan

    run = tmp_path / "run"
    res = run_cli("reconstruct", case, "--out", run, "--method", "fdk", "--fdk-filter", "ram-lak",
                  "--fdk-cutoff", "0.8", "--reference", case / "reference.nrrd", "--snapshot-every", "0")
    assert res.returncode == 0, res.stderr
    started = parse_events(res.stdout)[0]
    assert started["settings"]["filter"] == "ram-lak" and started["settings"]["cutoff"] == 0.8
    reference = read_volume(case / "reference.nrrd")
    expected = fdk(load_scan(case), reference.grid, FDKConfig(filter="ram-lak", cutoff=0.8)).array
    np.testing.assert_allclose(read_volume(run / "volume.nrrd").array, expected, rtol=1e-5, atol=1e-7)
    assert not (run / "snapshot.nrrd").exists()  # --snapshot-every 0: none
    failed = _refused(run_cli("reconstruct", case, "--out", tmp_path / "r1", "--method", "nerf", "--fdk-filter",
                              "hann"), tmp_path / "r1")
    assert "--method fdk" in failed["message"]
    failed = _refused(run_cli("reconstruct", case, "--out", tmp_path / "r2", "--method", "fdk", "--fdk-filter",
                              "box"), tmp_path / "r2")
    assert "hann" in failed["message"]


def test_tv_weight_option(case, tmp_path):
    """nerf's TV weight is derived from the data unless --tv-weight sets it; progress events say which
    weight is in use; the option is refused before any work for another method or a negative value."""
    runs = {}
    for name, extra in (("auto", []), ("set", ["--tv-weight", "0.05"])):
        res = run_cli("reconstruct", case, "--out", tmp_path / name, "--method", "nerf", "--iterations", "4",
                      "--progress-every", "2", "--snapshot-every", "0", *extra)
        assert res.returncode == 0, res.stderr
        runs[name] = parse_events(res.stdout)
    weights = {name: {e["tv_weight"] for e in events if e["event"] == "progress" and "tv_weight" in e}
               for name, events in runs.items()}
    assert weights["set"] == {0.05} and runs["set"][0]["settings"]["tv_weight"] == 0.05
    (auto,) = weights["auto"]
    assert auto > 0 and auto != 0.05 and "tv_weight" not in runs["auto"][0]["settings"]
    failed = _refused(run_cli("reconstruct", case, "--out", tmp_path / "r1", "--method", "fdk", "--tv-weight",
                              "0.1"), tmp_path / "r1")
    assert "--method nerf" in failed["message"]
    failed = _refused(run_cli("reconstruct", case, "--out", tmp_path / "r2", "--method", "nerf", "--tv-weight",
                              "-1"), tmp_path / "r2")
    assert ">= 0" in failed["message"]


def test_cuda_request_without_gpu_is_a_missing_dependency(case, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    res = run_cli("reconstruct", case, "--out", tmp_path / "run", "--method", "fdk", "--device", "cuda")
    assert res.returncode == ExitCode.MISSING_DEPENDENCY
    (failed,) = parse_events(res.stdout)
    assert failed["kind"] == "missing_dependency" and "--device" in failed["message"]
    assert not (tmp_path / "run" / "volume.nrrd").exists()


class SnapshotPoller(threading.Thread):
    """Reads snapshot.nrrd as fast as it can while the worker replaces it; records every failure."""

    def __init__(self, path, shape_zyx):
        super().__init__(daemon=True)
        self.path, self.shape, self.reads, self.errors = path, shape_zyx, 0, []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            if not self.path.exists():
                time.sleep(0.01)
                continue
            try:
                arr = sitk.GetArrayFromImage(sitk.ReadImage(str(self.path)))
                if arr.shape != self.shape or not np.all(np.isfinite(arr)):
                    self.errors.append(f"bad snapshot {arr.shape}")
                self.reads += 1
            except RuntimeError as exc:
                self.errors.append(str(exc))


def _stream_until(proc, predicate, timeout=90.0) -> list[dict]:
    """Read events from a running worker until predicate(events) holds."""
    events, t0 = [], time.time()
    for line in proc.stdout:
        events.append(json.loads(line))
        if predicate(events) or time.time() - t0 > timeout:
            break
    return events


NERF_FAST = ("--method", "nerf", "--preset", "preview", "--snapshot-every", "2", "--device", "cpu")


def _finish(proc, events):
    out, err = proc.communicate(timeout=120)
    events += [json.loads(line) for line in out.splitlines() if line.strip()]
    return err


def test_sigterm_cancels_cleanly_and_snapshots_are_never_torn(case, tmp_path):
    run = tmp_path / "run"
    # the residuals of (nearly) every snapshot: no 10 s wait between them
    proc = popen_cli("reconstruct", case, "--out", run, "--iterations", "100000", "--residuals-every", "0.001",
                     *NERF_FAST)
    events = _stream_until(proc, lambda ev: ev[-1]["event"] in ("started", "failed"))
    assert events[-1]["event"] == "started", proc.stderr.read()
    poller = SnapshotPoller(run / "snapshot.nrrd", tuple(reversed(events[0]["grid"]["shape_xyz"])))
    poller.start()
    events += _stream_until(proc, lambda ev: sum(e["event"] == "snapshot" for e in ev) >= 3)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc, events)
    poller.stop.set()
    poller.join(10)
    assert proc.returncode == 0, err
    check_order(events)
    assert events[-1]["event"] == "finished" and events[-1]["cancelled"] is True
    assert (run / "events.jsonl").read_text().splitlines() == [json.dumps(e, separators=(",", ":")) for e in events]
    seqs = [e["sequence"] for e in events if e["event"] == "snapshot"]
    assert seqs == list(range(1, len(seqs) + 1))
    live = [(before, e) for before, e in zip(events, events[1:]) if e["event"] == "residuals"]
    assert live, [e["event"] for e in events]
    for snapshot, residuals in live:  # each after its snapshot, of the same iteration, one RMSE per view
        assert residuals["iteration"] == snapshot["iteration"] and len(residuals["rmse"]) == 24
        assert residuals["worst_view"] == int(np.argmax(residuals["rmse"])) and residuals["median_rmse"] > 0
    assert poller.reads > 0 and poller.errors == []
    assert "Traceback" not in err
    volume = read_volume(run / "volume.nrrd")
    assert volume.array.shape == poller.shape and volume.array.max() > 0
    assert (run / "checkpoint.pt").exists()


def test_cancel_file_stops_and_resume_continues(case, tmp_path):
    run = tmp_path / "run"
    proc = popen_cli("reconstruct", case, "--out", run, "--iterations", "100000", *NERF_FAST)
    events = _stream_until(proc, lambda ev: ev[-1]["event"] in ("snapshot", "failed"))
    (run / "cancel").touch()
    _finish(proc, events)
    assert proc.returncode == 0
    assert events[-1]["event"] == "finished" and events[-1]["cancelled"] is True
    stopped_at = events[-1]["iteration"]
    # without --resume the cancelled run is kept; with it, it continues from the checkpoint
    assert run_cli("reconstruct", case, "--out", run, *NERF_FAST).returncode == ExitCode.BAD_INPUT
    target = stopped_at + 6  # snapshots every 2 iterations: it stopped within 2 of stopped_at
    res = run_cli("reconstruct", case, "--out", run, "--resume", "--iterations", target, *NERF_FAST)
    assert res.returncode == 0, res.stderr
    more = parse_events(res.stdout)
    check_order(more)
    assert more[0]["resumed"] is True and not (run / "cancel").exists()
    assert more[-1]["cancelled"] is False and more[-1]["iteration"] == target
    first_progress = next(e for e in more if e["event"] == "progress")
    assert first_progress["iteration"] > stopped_at
    log = (run / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in log].count("started") == 2  # resume appends


def test_events_go_on_to_the_log_when_the_stream_breaks(tmp_path):
    """A client that stops reading (a relaying launcher that died) must not fail the run: events.jsonl
    keeps every event."""
    import os

    from CTNeRFReconLib.events import EventWriter, read_events

    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    os.close(read_end)  # the reader is gone: writing raises BrokenPipeError
    writer = EventWriter(stream)
    log = open(tmp_path / "events.jsonl", "a", encoding="utf-8")
    writer.attach_log(log, truncate=True)
    writer.emit("started", views=1)
    writer.emit("finished", cancelled=False)
    writer.close()
    assert [e["event"] for e in read_events(tmp_path / "events.jsonl")] == ["started", "finished"]
    assert writer.stream is None
