"""Fault injection on real worker processes and real run folders (test_fault_matrix.py and
benchmarks/bench_robustness.py): kill the worker at chosen or random moments, then check that the
folder is never torn and that --resume continues from the last complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from worker_case import cli_command, cli_env, REPO

WORKER = ("--method", "nerf", "--preset", "preview", "--device", "cpu", "--grid-size", "12", "12", "12",
          "--snapshot-every", "1")
"""A tiny training grid and a snapshot every iteration: writes happen all the time."""

TEMP_KINDS = {"snapshot": ".snapshot.", "checkpoint": ".checkpoint.", "volume": ".volume.", "run": ".run.",
              "preview": ".preview."}


def start_worker(data, run, *args, preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen(cli_command("reconstruct", data, "--out", run, *WORKER, *args), cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            preexec_fn=preexec_fn)


class EventReader(threading.Thread):
    """Collects a worker's stdout events in the background."""

    def __init__(self, proc: subprocess.Popen):
        super().__init__(daemon=True)
        self.proc, self.events, self.lines = proc, [], []
        self.start()

    def run(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                pass

    def wait_for(self, pred, timeout: float) -> bool:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if any(pred(e) for e in list(self.events)):
                return True
            if self.proc.poll() is not None and not self.is_alive():
                return any(pred(e) for e in self.events)
            time.sleep(0.02)
        return False


# -- what a torn folder would look like -----------------------------------------------------------------
def folder_problems(run: Path) -> list[str]:
    """Every file of the run folder must be complete: volumes and checkpoint readable, JSON parsed,
    PNGs decodable, every events.jsonl line whole (but a last line without its newline)."""
    from CTNeRFReconLib.nerf.checkpoint import read_checkpoint
    from CTNeRFReconLib.volume_io import read_volume

    problems = []
    if not run.exists():
        return problems
    for p in sorted(run.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue  # a killed writer's temporary file: not a result, removed by the next run
        try:
            if p.suffix == ".nrrd":
                read_volume(p)
            elif p.name == "checkpoint.pt":
                read_checkpoint(p)
            elif p.suffix == ".json":
                if not isinstance(json.loads(p.read_text()), dict):
                    raise ValueError("not an object")
            elif p.suffix == ".png":
                from PIL import Image

                with Image.open(p) as im:
                    im.load()
            elif p.name == "events.jsonl":
                data = p.read_bytes()
                lines = data.split(b"\n")
                # every line but the last must be a whole event; the last (b"" after a final newline) may
                # be torn by a kill: readers skip it and the next run starts on a new line
                for k, line in enumerate(lines[:-1]):
                    if line.strip() and not isinstance(json.loads(line), dict):
                        raise ValueError(f"line {k + 1} is not an event")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{p.name}: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
    return problems


def temporaries(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".")) if run.exists() else []


def checkpoint_info(run: Path):
    """(iteration, history) of a readable checkpoint, else None."""
    from CTNeRFReconLib.formats.validate import ScanFormatError
    from CTNeRFReconLib.nerf.checkpoint import read_checkpoint

    p = run / "checkpoint.pt"
    if not p.exists():
        return None
    try:
        ck = read_checkpoint(p)
    except ScanFormatError:
        return None
    return ck["iteration"], [list(map(float, r)) for r in ck["history"]]


# -- one trial -----------------------------------------------------------------------------------------
@dataclass
class Trial:
    mode: str
    delay_s: float = 0.0
    killed_at: str = ""
    problems: list = field(default_factory=list)
    checkpoint_iteration: int | None = None
    resumed: bool | None = None
    resume_problem: str = ""
    seconds: float = 0.0

    @property
    def lost(self) -> bool:
        """A result was lost: a torn file, or a resume that did not continue from the last checkpoint."""
        return bool(self.problems) or bool(self.resume_problem)


def _poll_temp(run: Path, prefix: str, stop: threading.Event, seen: list):
    while not stop.is_set():
        try:
            names = os.listdir(run)
        except OSError:
            names = []
        if any(n.startswith(prefix) for n in names):
            seen.append(time.monotonic())
            return
        time.sleep(0.0005)


MODES = ("random", "cancel_then_kill", "on_snapshot_write", "on_checkpoint_write", "on_volume_write",
         "on_run_json_write", "sigterm_storm")


def kill_trial(data: Path, run: Path, mode: str, rng: random.Random, resume: bool = True,
               first_event_timeout: float = 300.0) -> Trial:
    """Start a worker on `run` (continuing it when it holds a run), hurt it as `mode` says, check the
    folder, then --resume and check that it continues from the last complete checkpoint."""
    t0 = time.monotonic()
    trial = Trial(mode)
    resuming = (run / "events.jsonl").exists()
    proc = start_worker(data, run, "--iterations", "100000", *(("--resume",) if resuming else ()))
    reader = EventReader(proc)
    try:
        if not reader.wait_for(lambda e: e.get("event") in ("snapshot", "failed"), first_event_timeout):
            trial.problems.append("no snapshot before the timeout")
            return trial
        if any(e.get("event") == "failed" for e in reader.events):
            trial.problems.append("the worker failed: " + next(e["message"] for e in reader.events if e["event"] == "failed"))
            return trial
        if mode == "random":
            trial.delay_s = rng.uniform(0.0, 1.5)
            time.sleep(trial.delay_s)
            trial.killed_at = "random"
        elif mode == "cancel_then_kill":
            trial.delay_s = rng.uniform(0.0, 2.0)
            proc.send_signal(signal.SIGTERM)
            time.sleep(trial.delay_s)
            trial.killed_at = "after SIGTERM"
        elif mode == "sigterm_storm":
            for _ in range(rng.randint(5, 40)):
                if proc.poll() is not None:
                    break
                proc.send_signal(signal.SIGTERM)
                time.sleep(rng.uniform(0.0, 0.05))
            rc = proc.wait(300)
            reader.join(10)
            trial.killed_at = f"not killed (rc {rc})"
            last = reader.events[-1] if reader.events else {}
            if rc != 0 or last.get("event") != "finished" or last.get("cancelled") is not True:
                trial.problems.append(f"a SIGTERM storm did not end in a clean cancel: rc {rc}, last event {last}")
        else:
            kind = mode[3:-6]  # on_<kind>_write
            prefix = TEMP_KINDS[{"run_json": "run"}.get(kind, kind)]
            if kind != "snapshot":
                proc.send_signal(signal.SIGTERM)  # a cancel writes the checkpoint, volume and run.json
            stop, seen = threading.Event(), []
            poller = threading.Thread(target=_poll_temp, args=(run, prefix, stop, seen), daemon=True)
            poller.start()
            poller.join(60)
            stop.set()
            trial.killed_at = f"while {prefix}* was being written" if seen else "after the write (not seen)"
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    trial.problems += folder_problems(run)
    ck = checkpoint_info(run)
    trial.checkpoint_iteration = None if ck is None else ck[0]
    if resume and not trial.problems:
        target = (ck[0] if ck else 0) + 3
        res = subprocess.run(cli_command("reconstruct", data, "--out", run, *WORKER, "--resume", "--iterations",
                                         str(target)), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                             timeout=900)
        evs = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
        trial.resumed = res.returncode == 0
        if res.returncode != 0 or not evs or evs[-1].get("event") != "finished":
            trial.resume_problem = f"--resume failed (rc {res.returncode}): {res.stderr.strip()[-300:]}"
        elif evs[-1].get("iteration") != target:
            trial.resume_problem = f"--resume ended at iteration {evs[-1].get('iteration')}, not {target}"
        else:
            after = checkpoint_info(run)
            if ck is not None and (after is None or after[1][:len(ck[1])] != ck[1]):
                trial.resume_problem = "the resumed run did not continue the checkpoint's history"
            trial.problems += folder_problems(run)
            left = temporaries(run)
            if left:
                trial.problems.append(f"temporary files left after a clean run: {left}")
    trial.seconds = round(time.monotonic() - t0, 2)
    return trial
