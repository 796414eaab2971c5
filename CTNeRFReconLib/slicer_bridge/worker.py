"""The engine's command line in a subprocess, read without blocking, stopped cleanly.

The Slicer module must never wait on the reconstruction: :class:`WorkerProcess` starts
``<interpreter> -m CTNeRFReconLib ...`` with ``subprocess.Popen``, a thread reads its stdout line
by line into a queue (and another keeps the tail of stderr), and :meth:`WorkerProcess.poll`
drains the queue without blocking; a GUI timer calls it. The interpreter is configurable: Slicer's
own Python, or an external environment with a CUDA build of PyTorch. This checkout's (or the
installed module's) CTNeRFReconLib is put first on the worker's PYTHONPATH, so both run one engine.

Stopping escalates, as the protocol allows: first a ``cancel`` file in the run folder (the worker
writes its last volume and finishes with ``"cancelled": true``), then SIGTERM after
``cancel_grace_s`` (same effect, for a worker stuck between checks), then a kill of the whole
process tree (psutil) after ``terminate_grace_s``, so no compiler or data-loader child outlives it.
Before the worker has announced ``started`` it may still remove a stale cancel file, so a cancel
then also sends SIGTERM at once (the engine treats both alike).

Workers never outlive the Python that started them: every running worker is stopped, in the same
way, when that interpreter exits (``atexit``: Slicer quitting, a script ending), unless its
config says ``stop_at_exit=False``.
"""
from __future__ import annotations

import atexit
import collections
import enum
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..events import PROTOCOL_VERSION, ExitCode

LIB_ROOT = Path(__file__).resolve().parents[2]
"""The folder that holds the CTNeRFReconLib package (put on the worker's PYTHONPATH)."""


class WorkerState(enum.Enum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    EXITED = "exited"


def describe_exit(code: int | None) -> str:
    """A person's reading of a worker's exit status (ExitCode, or a signal for negative codes)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"stopped by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"stopped by signal {-code}"
    try:
        return {ExitCode.OK: "finished", ExitCode.BAD_INPUT: "refused the input",
                ExitCode.OUT_OF_MEMORY: "ran out of memory",
                ExitCode.MISSING_DEPENDENCY: "is missing a dependency",
                ExitCode.INTERNAL: "failed with an internal error"}[ExitCode(code)]
    except ValueError:
        return f"exited with code {code}"


@dataclass
class WorkerConfig:
    """How to start and stop the engine's process."""

    interpreter: str = sys.executable
    """Python that runs the engine (needs numpy, torch, SimpleITK... but not Slicer)."""
    env: dict | None = None
    """Base environment (None: this process's). In Slicer pass slicer.util.startupEnvironment(), so an
    external interpreter does not inherit Slicer's PYTHONHOME and library paths."""
    cancel_grace_s: float = 30.0
    """After the cancel file, how long the worker may take to write its last volume before SIGTERM."""
    terminate_grace_s: float = 10.0
    """After SIGTERM, how long before the whole process tree is killed."""
    stderr_lines: int = 200
    """Lines of the worker's stderr kept for error messages."""
    stop_at_exit: bool = True
    """Stop the worker when the Python that started it exits (closing Slicer)."""
    exit_timeout_s: float = 15.0
    """At exit, how long the worker may take to write its last volume before it is killed."""

    def check(self):
        interpreter = Path(self.interpreter)
        if not str(self.interpreter).strip():
            raise ValueError("no Python interpreter is set for the reconstruction engine; choose a python "
                             "executable (Slicer's PythonSlicer, or one with a CUDA build of PyTorch)")
        if interpreter.is_absolute() and not interpreter.is_file():
            raise ValueError(f"{interpreter}: the Python interpreter for the engine was not found; choose an "
                             "existing python executable")


@dataclass
class ReconstructRequest:
    """The arguments of ``python -m CTNeRFReconLib reconstruct`` (see CTNeRFReconLib/cli.py)."""

    data: Path
    out: Path
    reference: Path | None = None
    reference_units: str | None = None
    """'auto', 'mu' or 'hu' (None: the engine's default, auto)."""
    method: str | None = None
    """'nerf', 'fdk', or None for the engine's default (nerf when available)."""
    preset: str = "standard"
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    grid_spacing: float | None = None
    grid_size: tuple[int, int, int] | None = None
    iterations: int | None = None
    snapshot_every: int | None = None
    projections: Path | None = None
    extra_args: list[str] = field(default_factory=list)

    def to_args(self) -> list[str]:
        args = ["reconstruct", str(self.data), "--out", str(self.out), "--preset", self.preset,
                "--device", self.device, "--seed", str(int(self.seed))]
        if self.projections is not None:
            args += ["--projections", str(self.projections)]
        if self.reference is not None:
            args += ["--reference", str(self.reference)]
            if self.reference_units:
                args += ["--reference-units", self.reference_units]
        if self.method:
            args += ["--method", self.method]
        if self.resume:
            args.append("--resume")
        if self.overwrite:
            args.append("--overwrite")
        if self.grid_spacing:
            args += ["--grid-spacing", repr(float(self.grid_spacing))]
        if self.grid_size:
            args += ["--grid-size", *[str(int(s)) for s in self.grid_size]]
        if self.iterations:
            args += ["--iterations", str(int(self.iterations))]
        if self.snapshot_every is not None:
            args += ["--snapshot-every", str(int(self.snapshot_every))]
        return args + list(self.extra_args)


def worker_environment(base: dict | None = None) -> dict:
    """The worker's environment: the base one, this CTNeRFReconLib first on PYTHONPATH, unbuffered UTF-8."""
    env = dict(os.environ if base is None else base)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != LIB_ROOT]
    env["PYTHONPATH"] = os.pathsep.join([str(LIB_ROOT)] + paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


_PROBE = """
import importlib.util, json, sys
print(json.dumps([name for name in sys.argv[1:] if importlib.util.find_spec(name) is None]))
"""


def missing_modules(config: WorkerConfig, modules, timeout: float = 120.0) -> list[str]:
    """Which of ``modules`` (import names) the engine's interpreter cannot import, asked of that
    interpreter itself (with the worker's environment), so an external Python is checked too."""
    config.check()
    try:
        done = subprocess.run([str(config.interpreter), "-c", _PROBE, *modules], capture_output=True, text=True,
                              timeout=timeout, env=worker_environment(config.env), stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise ValueError(f"{config.interpreter}: cannot start the engine's Python ({exc.strerror}); choose an "
                         "existing python executable") from None
    except subprocess.TimeoutExpired:
        raise ValueError(f"{config.interpreter}: the engine's Python did not answer within {timeout:.0f} s; "
                         "check that it runs") from None
    try:
        return list(json.loads(done.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError):
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise ValueError(f"{config.interpreter}: could not ask the engine's Python which packages it has"
                         + (f": {tail}" if tail else "") + "; choose a working python executable") from None


class WorkerProcess:
    """One engine process; :meth:`poll` returns its protocol events as they arrive.

    Lines on stdout that are not protocol events are kept in :attr:`log` (with stderr's tail). When
    the process ends without a ``finished`` or ``failed`` event (a crash, a kill), poll returns a
    synthetic ``failed`` event (``"synthetic": true``) carrying the exit status and stderr's tail,
    so a client always sees exactly one terminal event.
    """

    def __init__(self, args: list[str], run_dir: Path | None = None, config: WorkerConfig | None = None,
                 module: str = "CTNeRFReconLib"):
        self.args = [str(a) for a in args]
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.config = config or WorkerConfig()
        self.module = module
        self.process: subprocess.Popen | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=self.config.stderr_lines)
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stdout_done = threading.Event()
        self._started_seen = threading.Event()
        self._terminal_seen = False
        self._reported_exit = False
        self._cancel_at: float | None = None
        self._terminated_at: float | None = None
        self.killed = False

    @classmethod
    def reconstruct(cls, request: ReconstructRequest, config: WorkerConfig | None = None) -> "WorkerProcess":
        return cls(request.to_args(), Path(request.out), config)

    @property
    def command(self) -> list[str]:
        return [str(self.config.interpreter), "-u", "-m", self.module, *self.args]

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def state(self) -> WorkerState:
        if self.process is None:
            return WorkerState.NOT_STARTED
        return WorkerState.RUNNING if self.process.poll() is None else WorkerState.EXITED

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_at is not None

    def start(self) -> "WorkerProcess":
        if self.process is not None:
            raise RuntimeError("this worker was already started; make a new WorkerProcess for another run")
        self.config.check()
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # its own process group: signals reach the whole tree
        try:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=worker_environment(self.config.env), text=True, encoding="utf-8", errors="replace",
                bufsize=1, **kwargs)
        except OSError as exc:
            raise ValueError(f"{self.config.interpreter}: cannot start the engine's Python ({exc.strerror}); "
                             "choose an existing python executable") from None
        self._threads = [threading.Thread(target=self._read_stdout, name="ctnerf-stdout", daemon=True),
                         threading.Thread(target=self._read_stderr, name="ctnerf-stderr", daemon=True)]
        for t in self._threads:
            t.start()
        if self.config.stop_at_exit:
            _register_live(self)
        return self

    # ------------------------------------------------------------------------------ reading

    def _read_stdout(self):
        try:
            for line in self.process.stdout:
                line = line.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    event = None
                if isinstance(event, dict) and "event" in event:
                    if event["event"] == "started":
                        self._started_seen.set()
                    self._queue.put(event)
                else:
                    self.log.append(line)
        finally:
            self._stdout_done.set()

    def _read_stderr(self):
        for line in self.process.stderr:
            line = line.rstrip()
            if line:
                self.log.append(line)

    def poll(self) -> list[dict]:
        """Every event that arrived since the last call (never blocks); also advances a cancel."""
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for event in events:
            if event.get("protocol") != PROTOCOL_VERSION:
                self.log.append(f"event of protocol {event.get('protocol')!r}, expected {PROTOCOL_VERSION}")
            if event.get("event") in ("finished", "failed"):
                self._terminal_seen = True
        self._advance_cancel()
        if (not self._reported_exit and self._stdout_done.is_set() and self._queue.empty()
                and self.process is not None and self.process.poll() is not None):
            self._reported_exit = True
            _unregister_live(self)
            for t in self._threads:
                t.join(timeout=1.0)
            if not self._terminal_seen:
                events.append(self._exit_event())
        return events

    def _exit_event(self) -> dict:
        code = self.process.returncode
        tail = [line for line in self.log if line.strip()][-5:]
        message = f"the reconstruction engine {describe_exit(code)} without reporting a result"
        if self.killed:
            message = "the reconstruction engine did not stop when asked and was killed"
        if tail:
            message += ": " + " | ".join(tail)
        kind = "bad_input" if code == ExitCode.BAD_INPUT else "internal"
        if code == ExitCode.MISSING_DEPENDENCY or any("ModuleNotFoundError" in line for line in tail):
            kind = "missing_dependency"
        return {"protocol": PROTOCOL_VERSION, "event": "failed", "time": round(time.time(), 3),
                "message": message, "kind": kind, "exit_code": code, "synthetic": True,
                "cancelled": self.cancel_requested}

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the process exits (or the timeout passes); returns its exit code or None."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    # ----------------------------------------------------------------------------- stopping

    def request_cancel(self):
        """Ask the worker to stop (cancel file; SIGTERM when there is no run folder or the worker has
        not announced ``started`` yet, when it may still remove a stale cancel file); never blocks.

        Later :meth:`poll` calls escalate to SIGTERM and then a kill if it does not exit in time.
        """
        if self.process is None or self.process.poll() is not None or self._cancel_at is not None:
            return
        self._cancel_at = time.monotonic()
        if self.run_dir is not None and self.run_dir.is_dir():
            (self.run_dir / "cancel").touch()
        if self.run_dir is None:
            self._terminate()
        elif not self._started_seen.is_set():
            self._send_sigterm()  # a cancel as the engine reads it; the escalation below keeps its clock

    def _send_sigterm(self):
        if self.process.poll() is None:
            try:
                self.process.terminate()
            except ProcessLookupError:
                pass

    def _terminate(self):
        if self._terminated_at is None and self.process.poll() is None:
            self._terminated_at = time.monotonic()
            self._send_sigterm()

    def _advance_cancel(self):
        if self._cancel_at is None or self.process is None or self.process.poll() is not None:
            return
        now = time.monotonic()
        if self._terminated_at is None and now - self._cancel_at >= self.config.cancel_grace_s:
            self._terminate()
        if self._terminated_at is not None and now - self._terminated_at >= self.config.terminate_grace_s:
            self.kill_tree()

    def stop(self, timeout: float | None = None) -> int | None:
        """Cancel and wait (blocking) until the process is gone: for scene close and module cleanup.

        ``timeout`` bounds the whole wait (default: both graces); whatever is left is killed.
        """
        if self.process is None:
            return None
        budget = self.config.cancel_grace_s + self.config.terminate_grace_s if timeout is None else timeout
        deadline = time.monotonic() + budget
        self.request_cancel()
        grace_end = min(deadline, (self._cancel_at or time.monotonic()) + self.config.cancel_grace_s)
        if self.wait(max(0.0, grace_end - time.monotonic())) is None:
            self._terminate()
            if self.wait(max(0.0, min(deadline, time.monotonic() + self.config.terminate_grace_s)
                             - time.monotonic())) is None:
                self.kill_tree()
        code = self.wait(5.0)
        self._kill_group()  # helpers a clean exit left behind
        for t in self._threads:
            t.join(timeout=2.0)
        if code is not None:
            _unregister_live(self)
        return code

    def descendants(self) -> list:
        """psutil.Process objects of the worker's living descendants (empty without psutil)."""
        try:
            import psutil
        except ImportError:
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill_tree(self):
        """Kill the worker and every process it started: psutil's view of its descendants, then
        (POSIX) its process group, which also reaches children already orphaned by its exit."""
        if self.process is None:
            return
        try:
            import psutil
        except ImportError:
            psutil = None
        if psutil is not None:
            procs = self.descendants()
            if self.process.poll() is None:
                try:
                    procs.append(psutil.Process(self.process.pid))
                except psutil.Error:
                    pass
            for p in procs:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=5.0)
        elif self.process.poll() is None:
            self.process.kill()
        self._kill_group()
        self.killed = True
        self.wait(5.0)

    def _kill_group(self):
        """SIGKILL what is left of the worker's own process group (POSIX; the group is the worker's pid)."""
        if os.name == "nt" or self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------------------------------ stop at exit

_LIVE: set = set()
_LIVE_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def _register_live(worker: WorkerProcess):
    global _ATEXIT_REGISTERED
    with _LIVE_LOCK:
        _LIVE.add(worker)
        if not _ATEXIT_REGISTERED:
            atexit.register(stop_all_workers)
            _ATEXIT_REGISTERED = True


def _unregister_live(worker: WorkerProcess):
    with _LIVE_LOCK:
        _LIVE.discard(worker)


def live_workers() -> list[WorkerProcess]:
    """Workers started here (with ``stop_at_exit``) whose process may still be running."""
    with _LIVE_LOCK:
        return [w for w in _LIVE if w.process is not None and w.process.poll() is None]


def stop_all_workers():
    """Stop every live worker (cancel, then SIGTERM, then kill, within each one's ``exit_timeout_s``).

    Registered with ``atexit`` when the first worker starts, so closing Slicer (or the end of a
    script) never leaves a reconstruction running; the cancelled run folders stay complete.
    """
    for worker in live_workers():
        try:
            worker.stop(timeout=worker.config.exit_timeout_s)
        except Exception:  # noqa: BLE001 - at exit, stop the others whatever happens to one
            worker.kill_tree()
    with _LIVE_LOCK:
        _LIVE.clear()
