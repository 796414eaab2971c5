"""Faults on real worker processes and real files: kills at any moment, SIGTERM storms, two workers on
one folder, a stale lock, a read-only folder, a full disk, a corrupt snapshot from an older version.

The run folder must never be torn (every file present complete and readable; the events log whole
but for a last line without its newline), --resume must continue from the last complete checkpoint,
and every refusal is a clean `failed` event. Kept short for CI; benchmarks/bench_robustness.py runs
many more kill trials.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from CTNeRFReconLib.events import ExitCode
from faults import EventReader, WORKER, checkpoint_info, folder_problems, kill_trial, start_worker, temporaries
from worker_case import cli_command, cli_env, parse_events, write_small_case, REPO


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_small_case(tmp_path_factory.mktemp("faults") / "case")


def _run(case, run, *args, preexec_fn=None, timeout=600):
    return subprocess.run(cli_command("reconstruct", case, "--out", run, *WORKER, *args), cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


# -- kills at random moments and during each kind of write ---------------------------------------------
def test_kill_matrix_never_tears_the_folder_and_resume_continues(case, tmp_path):
    rng = random.Random(13)
    run = tmp_path / "run"
    modes = ["on_snapshot_write", "random", "on_checkpoint_write", "cancel_then_kill", "on_volume_write",
             "random", "on_run_json_write", "sigterm_storm", "random", "cancel_then_kill"]
    trials = []
    for k, mode in enumerate(modes):
        trial = kill_trial(case, run, mode, rng, resume=k % 3 == 2 or k == len(modes) - 1)
        trials.append(trial)
        assert not trial.lost, (mode, trial)
    # the kills did land inside the writes they aimed at
    assert sum("being written" in t.killed_at for t in trials) >= 2, [t.killed_at for t in trials]
    assert sum(t.resumed is True for t in trials) >= 3


def test_a_corrupt_snapshot_from_an_older_version_is_replaced(case, tmp_path):
    run = tmp_path / "run"
    assert _run(case, run, "--iterations", "3").returncode == 0
    good = (run / "snapshot.nrrd").read_bytes()
    (run / "snapshot.nrrd").write_bytes(good[: len(good) // 3])  # torn by a non-atomic writer
    (run / ".volume.abc123.nrrd").write_bytes(b"NRRD0004\n")     # a temporary left by a killed one
    (run / ".projection_check.abc123.png").write_bytes(b"\x89PNG")  # killed while drawing the check
    res = _run(case, run, "--resume", "--iterations", "6")
    assert res.returncode == 0, res.stderr
    assert folder_problems(run) == [] and temporaries(run) == []


# -- one folder, one worker ------------------------------------------------------------------------------
def test_a_second_worker_is_refused_while_the_first_runs(case, tmp_path):
    run = tmp_path / "run"
    first = start_worker(case, run, "--iterations", "100000")
    reader = EventReader(first)
    try:
        assert reader.wait_for(lambda e: e.get("event") == "snapshot", 300)
        for extra in ((), ("--resume",), ("--overwrite",)):
            res = _run(case, run, "--iterations", "5", *extra)
            assert res.returncode == ExitCode.BAD_INPUT, res.stderr
            ev = parse_events(res.stdout)
            assert [e["event"] for e in ev] == ["failed"] and ev[0]["kind"] == "bad_input"
            assert "running in this folder" in ev[0]["message"] and "Traceback" not in res.stderr
        assert first.poll() is None  # the first one is untouched
        (run / "cancel").touch()
        assert first.wait(300) == 0
        reader.join(10)
        assert reader.events[-1]["event"] == "finished" and reader.events[-1]["cancelled"] is True
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_a_stale_lock_does_not_block_a_later_run(case, tmp_path):
    run = tmp_path / "run"
    first = start_worker(case, run, "--iterations", "100000")
    reader = EventReader(first)
    assert reader.wait_for(lambda e: e.get("event") == "snapshot", 300)
    first.kill()
    first.wait()
    res = _run(case, run, "--resume", "--iterations", "4")
    assert res.returncode == 0, res.stderr
    # a `started` event whose pid now belongs to another live process (pid reuse) does not block either
    with open(run / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"protocol": 1, "event": "started", "time": time.time(), "pid": os.getpid()}) + "\n")
    res = _run(case, run, "--resume", "--iterations", "5")
    assert res.returncode == 0, res.stderr


def _make_read_only(folder: Path) -> bool:
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def _undo_read_only(folder: Path):
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def test_a_read_only_run_folder_is_refused_before_any_work(case, tmp_path):
    run = tmp_path / "run"
    assert _run(case, run, "--iterations", "2").returncode == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    if not _make_read_only(run):
        pytest.skip("cannot make a folder read-only here (chattr +i refused)")
    try:
        res = _run(case, run, "--resume", "--iterations", "4")
        ev = parse_events(res.stdout)
        assert res.returncode == ExitCode.BAD_INPUT, res.stderr
        assert [e["event"] for e in ev] == ["failed"] and ev[0]["kind"] == "bad_input"
        assert ev[0]["message"].startswith(f"{run}: the run folder cannot be written") and "Fix:" in ev[0]["message"]
        assert "Traceback" not in res.stderr
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    finally:
        _undo_read_only(run)


# -- a full disk --------------------------------------------------------------------------------------------
def _file_size_limit(nbytes: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def _check_disk_full(res, run: Path, ck_before):
    assert res.returncode == ExitCode.BAD_INPUT, res.stderr
    assert "Traceback" not in res.stderr
    ev = parse_events(res.stdout)
    assert ev[-1]["event"] == "failed" and ev[-1]["kind"] == "bad_input", ev[-1]
    msg = ev[-1]["message"]
    assert "could not be written" in msg and "Fix:" in msg and "--resume" in msg, msg
    assert folder_problems(run) == []  # the earlier snapshot, volume and checkpoint are whole
    assert temporaries(run) == []      # the failed write's temporary was removed
    assert checkpoint_info(run)[0] == ck_before


def test_a_file_size_limit_mid_run_fails_cleanly_and_keeps_the_last_checkpoint(case, tmp_path):
    run = tmp_path / "run"
    assert _run(case, run, "--iterations", "3").returncode == 0
    ck_size = (run / "checkpoint.pt").stat().st_size
    # snapshots (a few KB) still fit, the checkpoint does not: the run fails at its end
    res = _run(case, run, "--resume", "--iterations", "6", preexec_fn=_file_size_limit(ck_size // 2))
    _check_disk_full(res, run, 3)
    assert _run(case, run, "--resume", "--iterations", "6").returncode == 0  # and resumes once there is room
    assert checkpoint_info(run)[0] == 6


def test_a_full_disk_mid_run_fails_cleanly_and_keeps_the_last_checkpoint(case, tmp_path):
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    probe = tmp_path / "probe"
    assert _run(case, probe, "--iterations", "3").returncode == 0
    used = sum(p.stat().st_size for p in probe.iterdir())
    ck_size = (probe / "checkpoint.pt").stat().st_size
    size_kb = used // 1024 + 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root); the file-size-limit test covers it")
    try:
        run = mnt / "run"
        shutil.copytree(probe, run)
        # fill the disk so that snapshots still fit but a second checkpoint beside the first does not
        st = os.statvfs(mnt)
        (mnt / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - ck_size // 2))
        res = _run(case, run, "--resume", "--iterations", "6")
        _check_disk_full(res, run, 3)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_kernel_build_killed_mid_way_does_not_block_later_builds(tmp_path):
    """torch's build lock is a plain file that a killed builder leaves behind; later builds must not
    wait for it forever."""
    from CTNeRFReconLib import kernels

    plan = kernels.plan_build()
    cache = tmp_path / "kernels"
    if plan.build_dir.is_dir():  # start from the built objects: ninja has (almost) nothing to do
        shutil.copytree(plan.build_dir, cache / plan.build_dir.relative_to(kernels.cache_root()))
    env = dict(cli_env(), **{kernels.CACHE_ENV: str(cache)})
    build_dir = cache / plan.build_dir.relative_to(kernels.cache_root())
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "lock").touch()  # what a builder killed mid-way leaves
    code = "from CTNeRFReconLib import kernels; kernels.build(kernels.plan_build()); print('built')"
    try:
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("the build waited for a stale lock")
    if res.returncode != 0 and "ninja" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ninja here")
    assert res.returncode == 0 and "built" in res.stdout, res.stderr[-2000:]
    assert not (build_dir / "lock").exists()
