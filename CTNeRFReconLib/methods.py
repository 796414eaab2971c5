"""The contract between the worker (CLI) and the reconstruction methods.

A method turns a scan into a volume on a requested output grid. It reports through a RunContext,
which the worker implements (events on stdout and events.jsonl, atomic snapshots, cancel), so a
method never knows about files, terminals or Slicer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from .data import ScanData, Volume
from .geometry import VolumeGrid


@dataclass
class RunContext:
    """What a running method may use: device, seed, reporting, cancel, checkpoints."""

    device: str = "cpu"
    """Torch device string the method must run on ('cpu' or 'cuda')."""
    seed: int = 0
    run_dir: Path | None = None
    """The run folder (checkpoints go here); None for in-memory use (tests, Python console)."""
    resume: bool = False
    """Continue from run_dir/checkpoint.pt when it exists."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Method settings from the command line (preset, iterations, ...), already validated."""
    on_progress: Callable[..., None] = lambda **fields: None
    """Called with iteration, loss, projection_psnr, rays_per_batch, lr, elapsed_s, gpu_mem_mb..."""
    on_snapshot: Callable[[Volume, int], None] = lambda volume, iteration: None
    """Called with an intermediate volume on the output grid; the worker writes it atomically."""
    should_stop: Callable[[], bool] = lambda: False
    """True once the user asked to stop (SIGTERM or a cancel file): save and return promptly."""
    on_message: Callable[[str], None] = lambda text: None
    """A short line for the person watching (what was found or decided); the worker prints it."""
    clock_start: float | None = None
    """time.perf_counter() when the run started (a time limit counts from it); None: when the
    method starts."""
    report: dict[str, Any] = field(default_factory=dict)
    """What the method found and decided (the object's support, the time budget...): the worker
    writes it into run.json as `method_report`."""

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else Path(self.run_dir) / "checkpoint.pt"


class Method(Protocol):
    """A reconstruction method: scan in, volume on `grid` out."""

    name: str

    def reconstruct(self, scan: ScanData, grid: VolumeGrid, ctx: RunContext) -> Volume: ...


_REGISTRY: dict[str, Callable[[], Method]] = {}


def register(name: str):
    """Class decorator that makes a method available to the CLI under `name`."""
    def deco(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


BUILTIN_METHODS = {"fdk": ".fdk", "nerf": ".nerf.method"}
"""The methods this package ships and the module that registers each; the modules (and torch) load
only when a method is asked for."""


def check_method_name(name: str) -> str:
    """`name` when it is a method (built in or registered), else ValueError listing them, without
    importing any method: the command line refuses a bad option in a fraction of a second."""
    known = sorted(set(BUILTIN_METHODS) | set(_REGISTRY))
    if name not in known:
        raise ValueError(f"unknown method '{name}'; choose one of: {', '.join(known)}")
    return name


def get_method(name: str) -> Method:
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def _load_builtin_methods():
    # imported lazily so that `info`, the option checks and the Slicer bridge stay light
    import importlib

    for module in BUILTIN_METHODS.values():
        importlib.import_module(module, __package__)
