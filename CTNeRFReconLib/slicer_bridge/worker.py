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

The process started may be a launcher rather than the engine: Slicer's ``PythonSlicer`` is a CTK
AppLauncher that runs ``python-real`` as a QProcess child in its own process group, installs no
signal handler and forwards no signal; SIGTERM ends the launcher alone and leaves the engine
running as an orphan (with PythonSlicer's forwarded channels it still writes to our pipes; a
relaying launcher's death breaks them). So the engine's own process is tracked: its pid from the
``started`` event, accepted only when it is the started process itself or one of its
descendants, and before ``started`` the child of the started process that runs the engine's
command line; every descendant seen is remembered, so an orphan stays known. Decisions:

* SIGTERM goes to the engine only, never to a launcher: the launcher then exits by itself with the
  engine's exit code, and its relayed output stays intact. Only when no engine is known (no
  ``started`` yet, no child with the engine's command line) does the started process get it.
* The escalation, :meth:`WorkerProcess.stop` and :meth:`WorkerProcess.wait` go on while any
  process of the tree (launcher, engine, their children) is alive, not only the launcher; the kill
  reaches the whole tree through psutil (orphans included) and, on POSIX, the process group.
* A cancel asked before ``started`` is never lost: the engine removes a cancel file older than its
  own start, and the bridge writes the file again when ``started`` arrives (after that removal, so
  it always counts), and SIGTERMs the engine's process as soon as it is known (the engine reads it
  as a cancel, or dies at once while still importing). Without a launcher the engine's process is
  not told apart from a launcher before ``started``, so it only gets the renewed cancel file then.
* Windows: ``terminate()`` is TerminateProcess, a kill with no handler, and CTRL_BREAK is not a
  cancel the engine reads, so there a cancel relies on the cancel file; the SIGTERM step is
  skipped and the tree is killed (psutil, children recursively; ``taskkill /T /F`` without
  psutil) after both graces. There is no ``os.killpg``.
* If the launcher exits while the engine still runs (its output pipe closed by the launcher's
  death), nobody reads the engine any more: it is cancelled like above, and the exit is reported
  only once the engine is gone.

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
    drop_views: tuple[int, ...] = ()
    """Views (indices into the data) left out of the run: `--drop-views`."""
    extra_args: list[str] = field(default_factory=list)

    def to_args(self) -> list[str]:
        args = ["reconstruct", str(self.data), "--out", str(self.out), "--preset", self.preset,
                "--device", self.device, "--seed", str(int(self.seed))]
        if self.projections is not None:
            args += ["--projections", str(self.projections)]
        if self.drop_views:
            args += ["--drop-views", *[str(int(v)) for v in self.drop_views]]
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


def _psutil():
    """psutil, or None where it is not installed (then only the started process and, from the
    ``started`` event, the engine's pid are known)."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _alive(proc) -> bool:
    """Whether a psutil.Process still runs: a zombie, or a pid now used by another process, does not."""
    psutil = _psutil()
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pid_alive(pid: int) -> bool:
    """Without psutil: whether a pid exists (POSIX; a zombie counts as alive)."""
    if os.name == "nt":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _CountedLog(collections.deque):
    """The last lines of the engine's messages, counting every line ever added, so that a reader that
    shows them as they come (the panel's log) can tell which lines are new once old ones fall out."""

    def __init__(self, maxlen: int):
        super().__init__(maxlen=maxlen)
        self.count = 0
        self._lock = threading.Lock()

    def append(self, line) -> None:
        with self._lock:
            super().append(line)
            self.count += 1

    def since(self, seen: int) -> tuple[int, list[str]]:
        """(lines added in all, the lines added after the first ``seen`` that are still kept)."""
        with self._lock:
            lines = list(self)
            return self.count, lines[max(0, len(lines) - (self.count - seen)):]


class WorkerProcess:
    """One engine process; :meth:`poll` returns its protocol events as they arrive.

    Lines on stdout that are not protocol events are kept in :attr:`log` (with stderr's tail). When
    the process ends without a ``finished`` or ``failed`` event (a crash, a kill), poll returns a
    synthetic ``failed`` event (``"synthetic": true``) carrying the exit status and stderr's tail,
    so a client always sees exactly one terminal event.

    :attr:`pid` is the process started (the interpreter, or a launcher such as PythonSlicer);
    :attr:`engine_pid` is the engine's own process once its ``started`` event named it (the same
    pid when there is no launcher). :attr:`state`, :meth:`wait` and :attr:`exit_code` go by both:
    the worker runs while either does; :meth:`alive` also counts the processes they started.
    """

    def __init__(self, args: list[str], run_dir: Path | None = None, config: WorkerConfig | None = None,
                 module: str = "CTNeRFReconLib"):
        self.args = [str(a) for a in args]
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.config = config or WorkerConfig()
        self.module = module
        self.process: subprocess.Popen | None = None
        self.log: _CountedLog = _CountedLog(self.config.stderr_lines)
        self.engine_pid: int | None = None
        """The engine's pid from its ``started`` event, once checked to belong to this worker's tree."""
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stdout_done = threading.Event()
        self._started_seen = threading.Event()
        self._terminal_read = threading.Event()  # the engine reported its end: it is only exiting now
        self._lock = threading.RLock()
        self._root = None  # psutil.Process of the started process
        self._engine = None  # psutil.Process of the engine (the root itself when there is no launcher)
        self._tracked: set = set()  # every descendant seen so far (kept when its parent dies: an orphan)
        self._terminal_seen = False
        self._reported_exit = False
        self._cancel_at: float | None = None
        self._early_sigterm = False
        self._tracked_at = -1e9
        self._terminated_at: float | None = None
        self.killed = False

    @classmethod
    def reconstruct(cls, request: ReconstructRequest, config: WorkerConfig | None = None) -> "WorkerProcess":
        return cls(request.to_args(), Path(request.out), config)

    @property
    def command(self) -> list[str]:
        return [str(self.config.interpreter), "-u", "-m", self.module, *self.args]

    @property
    def log_count(self) -> int:
        """How many lines :attr:`log` has received in all (it keeps only the last ``stderr_lines``)."""
        return self.log.count

    @property
    def pid(self) -> int | None:
        """The pid of the process started (a launcher's, when the interpreter is one)."""
        return None if self.process is None else self.process.pid

    @property
    def state(self) -> WorkerState:
        if self.process is None:
            return WorkerState.NOT_STARTED
        return WorkerState.RUNNING if self._main_alive() else WorkerState.EXITED

    @property
    def exit_code(self) -> int | None:
        """The started process's exit status (a launcher passes on the engine's); None while it or
        the engine still runs."""
        if self.process is None or self._main_alive():
            return None
        return self.process.returncode

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
            kwargs["start_new_session"] = True  # its own process group, which a launcher's child shares
        try:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=worker_environment(self.config.env), text=True, encoding="utf-8", errors="replace",
                bufsize=1, **kwargs)
        except OSError as exc:
            raise ValueError(f"{self.config.interpreter}: cannot start the engine's Python ({exc.strerror}); "
                             "choose an existing python executable") from None
        psutil = _psutil()
        if psutil is not None:
            try:  # our own child: its pid cannot be reused before we reap it
                self._root = psutil.Process(self.process.pid)
            except psutil.Error:
                self._root = None
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
                        self._on_started(event)
                    elif event["event"] in ("finished", "failed"):
                        self._terminal_read.set()
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

    def _on_started(self, event: dict):
        """The engine is running its method (reader thread): adopt its pid, and renew a cancel that
        was asked before, whose file the engine may have removed as stale while it started."""
        try:
            engine = self._adopt_engine(event.get("pid"))
        except Exception as exc:  # noqa: BLE001 - the reader must go on whatever psutil says
            self.log.append(f"could not check the engine's process: {exc}")
            engine = None
        with self._lock:
            if engine is not None:
                self._engine = engine
            self._started_seen.set()
            renew = self._cancel_at is not None
        if renew:
            self._touch_cancel()

    def _adopt_engine(self, pid):
        """The engine's psutil.Process for the pid of its ``started`` event, if that process is ours:
        the started process itself, or one of its descendants (seen now or earlier). Without psutil
        the pid is taken as given (POSIX signals only)."""
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return None
        psutil = _psutil()
        if psutil is None:
            self.engine_pid = pid
            return None
        if self._root is None:
            return None
        if pid == self._root.pid:
            self.engine_pid = pid
            return self._root
        self._refresh_tree()
        with self._lock:
            match = next((p for p in self._tracked if p.pid == pid), None)
        if match is None:  # not seen as a descendant: an orphan already (its launcher died before)?
            try:
                proc = psutil.Process(pid)
                if self._runs_engine(proc) and proc.create_time() >= self._root.create_time():
                    match = proc
                    with self._lock:
                        self._tracked.add(proc)
            except psutil.Error:
                pass
        if match is None:
            self.log.append(f"the engine's started event names process {pid}, which this worker did not start; "
                            "it is not signalled")
            return None
        self.engine_pid = pid
        return match

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
        self._track_engine()
        self._advance_cancel()
        if (not self._reported_exit and self._stdout_done.is_set() and self._queue.empty()
                and self.process is not None and self.process.poll() is not None):
            if self._main_alive():
                # the launcher is gone and took the engine's output with it (a relaying launcher that
                # was killed): nobody reads the engine any more, so it is stopped like a cancel
                if self._cancel_at is None:
                    self.log.append("the launcher exited while the engine still ran; stopping the engine")
                    self.request_cancel()
                return events
            self._reported_exit = True
            _unregister_live(self)
            for t in self._threads:
                t.join(timeout=1.0)
            if not self._terminal_seen:
                events.append(self._exit_event())
        return events

    def _track_engine(self, every_s: float = 0.5):
        """Before ``started``, now and then: note the engine's process under a launcher, so it stays
        known (and can be signalled) even if the launcher dies before the engine names itself."""
        if self._engine is not None or self._started_seen.is_set() or self.process is None:
            return
        now = time.monotonic()
        if now - self._tracked_at >= every_s:
            self._tracked_at = now
            self._engine_target()

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
        """Block until the process and the engine have exited (or the timeout passes); returns the
        started process's exit code, or None."""
        if self.process is None:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return code if self._wait_gone(deadline) else None

    # ------------------------------------------------------------------------------ the tree

    def _refresh_tree(self) -> list:
        """The living processes of the worker's tree (psutil.Process): the started process, the
        engine and every descendant of theirs; a descendant once seen stays tracked after its parent
        died, so an orphaned engine is still found."""
        psutil = _psutil()
        if psutil is None or self._root is None:
            return []
        with self._lock:
            roots = [self._root, *([self._engine] if self._engine is not None else []), *self._tracked]
            seen = set()
            for proc in roots:
                if proc in seen or not _alive(proc):
                    continue
                seen.add(proc)
                try:
                    seen.update(proc.children(recursive=True))
                except psutil.Error:
                    pass
            living = [p for p in seen if _alive(p)]
            self._tracked = {p for p in living if p != self._root}
            return living

    def _engine_alive(self) -> bool:
        if self._engine is not None:
            return self._engine != self._root and _alive(self._engine)
        if _psutil() is None and self.engine_pid is not None and self.engine_pid != self.pid:
            return _pid_alive(self.engine_pid)
        return False

    def _main_alive(self) -> bool:
        """Whether the started process or the engine still runs (what wait, exit_code and the exit
        report go by; a helper that outlives them is the kill's business, not a reason to wait)."""
        if self.process is None:
            return False
        return self.process.poll() is None or self._engine_alive()

    def alive(self) -> bool:
        """Whether any of the worker's tree still runs (the started process, the engine, their children)."""
        if self.process is None:
            return False
        return self._main_alive() or bool(self._refresh_tree())

    def _wait_gone(self, deadline: float | None, interval: float = 0.05, advance: bool = True) -> bool:
        """Wait until the started process and the engine are gone (or the deadline passes); advances
        a cancel meanwhile."""
        while self._main_alive():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if advance:
                self._advance_cancel()
            time.sleep(interval)
        return True

    def _engine_target(self):
        """The process a cancel's SIGTERM goes to: the engine once known; before ``started``, a child
        of the started process that runs the engine's command line (the real interpreter under a
        launcher), if there is one yet. None: not known (yet).

        A child whose command line is the started process's own is a fork that has not exec'd yet (the
        engine starting its image reader, say), not a launcher's engine: a launcher's child always
        differs in its program (PythonSlicer runs python-real). Taking it would send the cancel to the
        reader, which the engine would then see die of SIGTERM."""
        if self._engine is not None:
            return self._engine
        psutil = _psutil()
        if psutil is None or self._root is None or self.process.poll() is not None:
            return None
        try:
            children = self._root.children()
            own = self._root.cmdline()
        except psutil.Error:
            return None
        for child in children:
            if self._runs_engine(child) and _alive(child) and not self._same_cmdline(child, own):
                with self._lock:
                    self._tracked.add(child)
                return child
        return None

    @staticmethod
    def _same_cmdline(proc, cmdline: list[str]) -> bool:
        try:
            return proc.cmdline() == cmdline
        except _psutil().Error:
            return True  # gone or hidden: not a process to signal

    def _runs_engine(self, proc) -> bool:
        """Whether a process's command line ends with the engine's (``-m CTNeRFReconLib ARGS``)."""
        tail = ["-m", self.module, *self.args]
        try:
            cmd = proc.cmdline()
        except _psutil().Error:
            return False
        return len(cmd) > len(tail) and cmd[-len(tail):] == tail

    def descendants(self) -> list:
        """psutil.Process objects of the worker's living descendants (the engine under a launcher
        among them; empty without psutil)."""
        return [p for p in self._refresh_tree() if p != self._root]

    # ----------------------------------------------------------------------------- stopping

    def _touch_cancel(self):
        if self.run_dir is not None and self.run_dir.is_dir():
            try:
                (self.run_dir / "cancel").touch()
            except OSError as exc:
                self.log.append(f"could not write the cancel file in {self.run_dir}: {exc}")

    def request_cancel(self):
        """Ask the worker to stop; never blocks. The cancel file goes into the run folder (and is
        written again when ``started`` arrives, since the engine removes a stale one as it starts);
        before ``started``, the engine's process (under a launcher, once it exists) also gets SIGTERM.

        Later :meth:`poll` calls escalate to SIGTERM and then a kill if it does not exit in time.
        """
        if self.process is None or self._cancel_at is not None or not self.alive():
            return
        with self._lock:
            self._cancel_at = time.monotonic()
            started = self._started_seen.is_set()
        self._touch_cancel()
        if self.run_dir is None:
            self._terminate()
        elif not started:
            self._early_cancel()

    def _early_cancel(self):
        """Before ``started``: SIGTERM to the engine as soon as it is known (the engine reads it as a
        cancel, or dies at once while still importing), without starting the kill's clock."""
        if self._early_sigterm or self._started_seen.is_set() or os.name == "nt":
            return
        target = self._engine_target()
        if target is not None:
            self._early_sigterm = True
            self._signal(target, signal.SIGTERM)

    def _signal(self, proc, sig):
        psutil = _psutil()
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass

    def _send_sigterm(self):
        """SIGTERM to the engine only (POSIX): a launcher has no handler and would die, leaving the
        engine orphaned (and, when it relays output, with a broken stdout); it exits by itself when
        the engine does. The started process gets it only when no engine is known. On Windows
        terminate() is TerminateProcess, a kill: there a cancel relies on the cancel file, then the kill."""
        if os.name == "nt":
            return
        target = self._engine_target()
        if target is not None:
            self._signal(target, signal.SIGTERM)
        elif _psutil() is None and self.engine_pid is not None and self.engine_pid != self.pid:
            try:
                os.kill(self.engine_pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        elif self.process.poll() is None:
            try:
                self.process.terminate()
            except ProcessLookupError:
                pass

    def _terminate(self):
        """The SIGTERM step; skipped (the kill's clock still starts) once the engine reported its end:
        it is shutting down, and a SIGTERM then would only turn a clean exit into a signalled one."""
        if self._terminated_at is None and self.alive():
            self._terminated_at = time.monotonic()
            if not self._terminal_read.is_set():
                self._send_sigterm()

    def _advance_cancel(self):
        if self._cancel_at is None or self.process is None or not self.alive():
            return
        if not self._started_seen.is_set():
            self._early_cancel()
        now = time.monotonic()
        if self._terminated_at is None and now - self._cancel_at >= self.config.cancel_grace_s:
            self._terminate()
        if self._terminated_at is not None and now - self._terminated_at >= self.config.terminate_grace_s:
            self.kill_tree()

    def stop(self, timeout: float | None = None) -> int | None:
        """Cancel and wait (blocking) until the process and the engine are gone: for scene close and
        module cleanup.

        ``timeout`` bounds the whole wait (default: both graces); whatever is left is killed.
        """
        if self.process is None:
            return None
        budget = self.config.cancel_grace_s + self.config.terminate_grace_s if timeout is None else timeout
        deadline = time.monotonic() + budget
        self.request_cancel()
        grace_end = min(deadline, (self._cancel_at or time.monotonic()) + self.config.cancel_grace_s)
        if not self._wait_gone(grace_end):
            self._terminate()
            if not self._wait_gone(min(deadline, time.monotonic() + self.config.terminate_grace_s)):
                self.kill_tree()
        code = self.wait(5.0)
        self._kill_leftovers()  # helpers a clean exit left behind
        for t in self._threads:
            t.join(timeout=2.0)
        if code is not None:
            _unregister_live(self)
        return code

    def kill_tree(self):
        """Kill the worker, the engine and every process they started (psutil's view of the tree,
        orphans included), then (POSIX) the process group, which also reaches children already
        orphaned by an exit; on Windows without psutil, ``taskkill /T /F``."""
        if self.process is None:
            return
        psutil = _psutil()
        if psutil is not None:
            procs = self._refresh_tree()
            for p in procs:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs([p for p in procs if p != self._root], timeout=5.0)  # the root: Popen reaps it
        else:
            if os.name == "nt" and self.process.poll() is None:
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.process.pid)], capture_output=True,
                               timeout=30, check=False)
            if self.engine_pid is not None and self.engine_pid != self.pid and os.name != "nt":
                try:
                    os.kill(self.engine_pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if self.process.poll() is None:
                self.process.kill()
        self._kill_group()
        self.killed = True
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        self._wait_gone(time.monotonic() + 5.0, advance=False)

    def _kill_leftovers(self):
        """Once the started process and the engine are gone: kill what they left running (psutil's
        tracked tree; on POSIX also the process group)."""
        if self.process is None or self._main_alive():
            return
        psutil = _psutil()
        if psutil is not None:
            procs = self._refresh_tree()
            for p in procs:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            if procs:
                psutil.wait_procs(procs, timeout=5.0)
        self._kill_group()

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
        return [w for w in _LIVE if w.alive()]


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
