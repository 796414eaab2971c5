"""Short engine commands (surface, export, check on a run folder; info on a scan), run without blocking
the panel.

The run-folder commands need the engine (torch, the trained field), so, like a reconstruction, they
run in the engine's interpreter as ``python -m CTNeRFReconLib COMMAND RUN_DIR ... --json``; ``info``
needs no torch and runs in whichever Python the caller names (the panel: Slicer's own, where it reads
scans). Their one-line JSON result is read from stdout. :class:`EngineCommand` starts one and is
polled from a GUI timer; :meth:`EngineCommand.result` gives the parsed result or raises ValueError
with the engine's message (the file, the field and the fix, as every refusal of the command line
reads).

The argument builders name each command's options once (see CTNeRFReconLib/cli_field.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from .worker import WorkerConfig, WorkerProcess


def surface_args(run_dir, out, threshold: str = "auto", spacing_mm: float | None = None) -> list[str]:
    """``surface``: an iso-surface of the run's field (or volume) at a threshold (auto, bone, skin, a value)."""
    args = ["surface", str(run_dir), f"--threshold={threshold}", "--out", str(out), "--overwrite", "--json"]
    if spacing_mm:
        args += ["--spacing", repr(float(spacing_mm))]
    return args


def export_args(run_dir, out, centre_xyz, size_xyz, spacing_mm: float) -> list[str]:
    """``export``: the run's field evaluated in a box (scanner frame, mm) at a voxel size, without retraining."""
    if not spacing_mm or spacing_mm <= 0:
        raise ValueError(f"export voxel size {spacing_mm} mm: give a positive voxel size")
    return (["export", str(run_dir), "--roi", *[repr(float(v)) for v in centre_xyz],
             *[repr(float(v)) for v in size_xyz], "--spacing", repr(float(spacing_mm)), "--out", str(out),
             "--overwrite", "--json"])


def check_args(run_dir, out, view: int | None = None) -> list[str]:
    """``check``: measured vs rendered projection of one view, and the residual of every view."""
    args = ["check", str(run_dir), "--out", str(out), "--json"]
    if view is not None:
        args += ["--view", str(int(view))]
    return args


def info_args(data) -> list[str]:
    """``info``: what the files of a scan say (format, views, detector, geometry), without carving the
    object's support (seconds on a large scan, and torch), for the panel's one-line summary."""
    return ["info", str(data), "--json", "--no-support"]


class EngineCommand:
    """One engine command in a subprocess; :meth:`poll` says whether it has ended (never blocks)."""

    def __init__(self, args: list[str], config: WorkerConfig | None = None):
        self.args = list(args)
        self.worker = WorkerProcess(self.args, None, config or WorkerConfig())

    def start(self) -> "EngineCommand":
        self.worker.start()
        return self

    def poll(self) -> bool:
        """True once the command's process has ended."""
        self.worker.poll()
        return self.worker.exit_code is not None

    def wait(self, timeout: float) -> dict:
        """Block until it ends (tests and the Python console), then :meth:`result`."""
        if self.worker.wait(timeout) is None:
            self.worker.stop(timeout=5)
            raise ValueError(f"the engine's '{self.args[0]}' did not finish within {timeout:.0f} s")
        self.worker.poll()
        return self.result()

    def result(self) -> dict:
        """The command's JSON result; ValueError with the engine's own message when it failed."""
        code = self.worker.exit_code
        lines = list(self.worker.log)
        for line in reversed(lines):
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if code == 0 and isinstance(value, dict):
                    return value
        message = next((line for line in reversed(lines) if line.startswith("error")), None)
        message = message or (" | ".join(lines[-3:]) if lines else f"no output (exit code {code})")
        raise ValueError(f"the engine's '{self.args[0]}' failed: {message}")

    def stop(self):
        self.worker.stop(timeout=5)

    def kill(self):
        """End it at once, without the cancel grace that `stop` waits for (blocking): for a command whose
        answer is not wanted any more and that writes nothing (``info``)."""
        self.worker.kill_tree()


def result_path(result: dict) -> Path:
    """The file a command wrote (its ``path`` or ``out`` field)."""
    for key in ("path", "out", "png"):
        if isinstance(result.get(key), str):
            return Path(result[key])
    raise ValueError(f"the engine's result names no file: {sorted(result)}")
