"""The run folder: the fixed names of what a reconstruction writes, and who may write there.

Everything a run writes has a fixed name below, so a client knows where to look and the worker
never has to delete anything: a new run replaces only these files. A folder that holds a finished
run (volume.nrrd and a `finished` event) is left alone unless the user says --overwrite or --resume.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .events import read_events

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (bad input, refused before any work)."""


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).absolute())

    volume = property(lambda self: self.root / "volume.nrrd")
    """The final reconstruction (attenuation, 1/mm, in the scanner frame)."""
    snapshot = property(lambda self: self.root / "snapshot.nrrd")
    """The latest intermediate volume, replaced atomically (a reader never sees a torn file)."""
    events = property(lambda self: self.root / "events.jsonl")
    run_json = property(lambda self: self.root / "run.json")
    metrics = property(lambda self: self.root / "metrics.json")
    preview = property(lambda self: self.root / "preview.png")
    projections_preview = property(lambda self: self.root / "projections.png")
    loss_preview = property(lambda self: self.root / "loss.png")
    cancel_file = property(lambda self: self.root / "cancel")
    """A client creates this file to stop the run (same effect as SIGTERM)."""

    def is_finished(self) -> bool:
        return self.volume.exists() and any(e.get("event") == "finished" for e in read_events(self.events))

    def last_snapshot_sequence(self) -> int:
        seqs = [e.get("sequence") for e in read_events(self.events) if e.get("event") == "snapshot"]
        return max((s for s in seqs if isinstance(s, int) and not isinstance(s, bool) and s >= 0), default=0)

    def running_pid(self) -> int | None:
        """The pid of a worker still running in this folder: its `started` has no end and it is alive."""
        import psutil

        events = read_events(self.events)
        starts = [i for i, e in enumerate(events) if e.get("event") == "started"]
        if not starts or any(e.get("event") in ("finished", "failed") for e in events[starts[-1]:]):
            return None
        pid = events[starts[-1]].get("pid")
        # a pid is a positive C int: a larger number in a tampered log names no process (and would overflow)
        if not (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31 and psutil.pid_exists(pid)):
            return None
        if pid != os.getpid() and not self._log_is_locked():
            return None  # a killed worker's pid now belongs to another process: its lock went with it
        return pid

    def _log_is_locked(self) -> bool:
        """Whether a live worker holds events.jsonl's lock (True where locks are not available)."""
        if fcntl is None:
            return True
        try:
            with open(self.events, "rb") as fh:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    return True
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                return False
        except OSError:
            return False

    def check_usable(self, resume: bool, overwrite: bool):
        """Refuse (RunFolderError) what would touch a finished run or a non-folder; writes nothing."""
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite contradict each other: --resume continues the "
                                 f"run in {self.root}, --overwrite starts it again; give one of them")
        if self.root.exists() and not self.root.is_dir():
            raise RunFolderError(f"{self.root}: the run folder path is an existing file; give a folder "
                                 "path (it is created if missing)")
        pid = self.running_pid()
        if pid is not None:
            raise RunFolderError(f"{self.root}: a reconstruction (process {pid}) is still running in this folder; "
                                 "wait for it, stop it (create the file 'cancel' there), or choose another --out")
        if self.is_finished() and not (resume or overwrite):
            raise RunFolderError(f"{self.root}: this folder holds a finished run (volume.nrrd and a finished "
                                 "event); choose another --out folder, or pass --overwrite to replace its "
                                 "results or --resume to continue it")

    def open_events_log(self):
        """Open events.jsonl for appending (creating the folder), locked for as long as it stays open.

        The lock (POSIX flock; on other systems only the pid check of check_usable) keeps two
        workers out of one folder; opening changes nothing in the file.
        """
        handle = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = open(self.events, "a", encoding="utf-8")
            with tempfile.TemporaryFile(dir=self.root):  # every result is written beside it, then renamed
                pass
        except OSError as exc:
            if handle is not None:
                handle.close()
            raise RunFolderError(f"{self.root}: the run folder cannot be written ({exc.strerror or exc}); "
                                 "nothing was done. Fix: choose a writable --out folder (permissions, a "
                                 "read-only disk or share), or make this one writable") from None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise RunFolderError(f"{self.root}: another reconstruction is running in this folder; wait "
                                     "for it, stop it (create the file 'cancel' there), or choose another --out")
        return handle

    def clock(self) -> float:
        """The run folder's own "now": the modification time of a file just made in it (the clock
        that stamps a cancel file too, the server's on a network share). The folder must exist."""
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".clock-") as probe:
            return os.fstat(probe.fileno()).st_mtime

    OUTPUT_NAMES = ("volume.nrrd", "snapshot.nrrd", "run.json", "metrics.json", "preview.png", "projections.png",
                    "loss.png", "checkpoint.pt", "reference.nrrd", "projection_check.png")

    def remove_stale_temporaries(self) -> list[str]:
        """Remove what a killed worker left half-written: the hidden temporary files of atomic writes
        (`.volume.<random>.nrrd`, ...). Call it only while holding the lock (no other writer)."""
        removed = []
        for name in self.OUTPUT_NAMES:
            stem, dot, ext = name.partition(".")
            for tmp in self.root.glob(f".{stem}.*.{ext}"):
                removed.append(tmp.name)
                tmp.unlink(missing_ok=True)
        for tmp in self.root.glob(".clock-*"):
            removed.append(tmp.name)
            tmp.unlink(missing_ok=True)
        return removed

    def remove_stale_cancel(self, older_than: float | None = None):
        """A cancel request left over from an earlier run must not stop the new one.

        ``older_than`` (the folder's :meth:`clock` when this run began): only a cancel file made
        before it is stale; one made since is this run's own cancel and stays. None: remove any.
        """
        try:
            if not self.cancel_file.is_file():
                return
            if older_than is not None and self.cancel_file.stat().st_mtime >= older_than:
                return
            self.cancel_file.unlink()
        except FileNotFoundError:
            pass
