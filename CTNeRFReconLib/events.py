"""The worker protocol's wire format: JSON-lines events, failure kinds and exit codes.

The Slicer module (or any client) starts `python -m CTNeRFReconLib reconstruct ...` and reads one
JSON object per line from its stdout; the same lines are appended to `<run>/events.jsonl`, so a
client that lost the pipe can re-read the run from the folder. Version 1 of the protocol:

* every event has ``"protocol": 1``, ``"event"`` (its kind) and ``"time"`` (Unix seconds, UTC);
* order: ``started``, then any number of ``progress``, ``snapshot`` and ``residuals`` (a snapshot's
  residual per view, after that snapshot), then at most one
  ``projection_check`` (not for a cancelled run, nor when the check itself failed), then exactly one of
  ``finished`` (``"cancelled": true`` when the user stopped it) or ``failed``; a refusal of bad
  input is a lone ``failed`` event;
* numbers that are not finite (NaN, inf) are sent as ``null``.
"""
from __future__ import annotations

import enum
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

PROTOCOL_VERSION = 1

EVENT_KINDS = ("started", "progress", "snapshot", "residuals", "projection_check", "finished", "failed")


class ExitCode(enum.IntEnum):
    """Process exit status of the worker. A cancelled run is a clean finish (OK): its folder holds a
    complete volume and its `finished` event says ``"cancelled": true``."""

    OK = 0
    BAD_INPUT = 2
    """Refused before any work (also argparse's code for a bad command line)."""
    OUT_OF_MEMORY = 3
    MISSING_DEPENDENCY = 4
    INTERNAL = 5


class FailureKind(str, enum.Enum):
    """The ``kind`` of a ``failed`` event, and the exit code that goes with it."""

    BAD_INPUT = "bad_input"
    OUT_OF_MEMORY = "out_of_memory"
    MISSING_DEPENDENCY = "missing_dependency"
    INTERNAL = "internal"

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode[self.name]


def to_json_value(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, paths to str, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json_value(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return to_json_value(value.value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def make_event(event: str, **fields) -> dict:
    if event not in EVENT_KINDS:
        raise ValueError(f"unknown event kind '{event}'; protocol {PROTOCOL_VERSION} has {', '.join(EVENT_KINDS)}")
    return {"protocol": PROTOCOL_VERSION, "event": event, "time": round(time.time(), 3),
            **to_json_value(fields)}


class EventWriter:
    """Writes each event as one line to the stream (when given) and to the log file (when given).

    Both are flushed after every line, so a client polling either sees whole events as they happen.
    """

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream
        self._log: IO[str] | None = None
        self._lock = threading.Lock()

    def attach_log(self, handle: IO[str], truncate: bool):
        """Also write to ``handle`` (a file opened for appending), emptied first when ``truncate``."""
        if truncate:
            handle.truncate(0)
        else:  # a log torn by a crash (a last line without its newline) must not swallow the next event
            try:
                with open(handle.name, "rb") as fh:
                    fh.seek(0, 2)
                    if fh.tell() > 0:
                        fh.seek(-1, 2)
                        if fh.read(1) != b"\n":
                            handle.write("\n")
                            handle.flush()
            except (OSError, TypeError):
                pass
        self._log = handle

    def emit(self, event: str, **fields) -> dict:
        record = make_event(event, **fields)
        line = json.dumps(record, allow_nan=False, separators=(",", ":"))
        with self._lock:
            if self.stream is not None:
                try:
                    self.stream.write(line + "\n")
                    self.stream.flush()
                except (BrokenPipeError, ValueError):
                    # the reader went away (a relaying launcher that died, a closed pipe): the run goes on,
                    # and events.jsonl keeps every event for a client that comes back
                    self.stream = None
            if self._log is not None:
                try:
                    self._log.write(line + "\n")
                    self._log.flush()
                except OSError as exc:  # disk full or a size limit: the stream still gets every event
                    log, self._log = self._log, None
                    try:
                        log.close()
                    except OSError:
                        pass
                    from .volume_io import write_failure
                    raise write_failure(getattr(log, "name", "events.jsonl"), exc) from None
        return record

    def close(self):
        if self._log is not None:
            self._log.close()
            self._log = None


def stdout_wants_events() -> bool:
    """JSON lines go to stdout when it is a pipe or file (a client), not a person's terminal."""
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):
        return True


def read_events(path: Path) -> list[dict]:
    """Events of a run folder's events.jsonl: lines that are not a whole JSON object (a line torn by a
    crash, bytes that are not UTF-8, another program's text) are ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for raw in path.read_bytes().splitlines():
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # torn or foreign lines are skipped
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
