"""`reconstruct`: one reconstruction from data on disk to a complete run folder, speaking the protocol.

The steps are fixed so a client can rely on them: check the run folder, load and check every
input (a refusal is a lone `failed` event with kind bad_input, exit code 2, and no volume), emit
`started`, run the method with a RunContext that turns its reports into `progress` and `snapshot`
events, then write volume.nrrd, metrics.json (with a reference), the PNG previews and run.json, and
emit `finished`. SIGTERM, Ctrl-C or a `cancel` file stop the method early; the run still finishes
cleanly with the volume it had (``"cancelled": true``, exit code 0).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .data import ScanData, Volume
from .events import EventWriter, ExitCode, FailureKind, stdout_wants_events
from .geometry import VolumeGrid
from .methods import RunContext, check_method_name, get_method
from .phantom import MU_WATER
from .projection_check import RESIDUALS_EVERY_S
from .rundir import RunFolder
from .volume_io import atomic_write, resample_to_grid, write_volume

PRESETS = ("preview", "standard", "high")
DEVICES = ("auto", "cpu", "cuda")


class MissingDependency(RuntimeError):
    """Something the run needs is not installed (a CUDA build of torch, a format reader...)."""


@dataclass
class ReconstructOptions:
    """Everything `reconstruct` takes from the command line (or the demo)."""

    data: Path
    """Scan file or folder (any format formats.load_scan detects)."""
    out: Path
    """Run folder."""
    projections: Path | None = None
    """Projection stack when `data` is a geometry file."""
    drop_views: tuple[int, ...] = ()
    """Views (indices into the data) left out of everything: a corrupt frame, or one stored under the wrong
    angle, which the projection check names (`ScanData.without_views`)."""
    reference: Path | None = None
    """Reference CT: its grid becomes the output grid, and the result is scored against it."""
    reference_units: str = "auto"
    """'mu' (1/mm), 'hu' (converted with mu_water) or 'auto' (HU when it has values below -100...)."""
    mu_water: float = MU_WATER
    method: str | None = None
    """None: 'nerf' when it is available, else 'fdk'."""
    preset: str = "standard"
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    grid_spacing: float | None = None
    """Voxel size (mm) of the output grid, keeping its box."""
    grid_size: tuple[int, int, int] | None = None
    """Voxel counts (x, y, z) of the output grid, keeping its box (or its centre with grid_spacing)."""
    iterations: int | None = None
    snapshot_every: int | None = None
    progress_every: int | None = None
    residuals_every: float = RESIDUALS_EVERY_S
    """Seconds at least between the per-view residuals of snapshots (`residuals` events; at most 2 % of the
    run's time goes to them); 0: none."""
    kernels: bool = True
    tv_weight: float | None = None
    """nerf's TV prior weight; None: derived from the data (nerf/prior_weight.py)."""
    quiet: bool = False
    fdk_filter: str | None = None
    """FDK's ramp filter window (fdk.FILTERS); None: FDK's default (hann)."""
    fdk_cutoff: float | None = None
    """FDK's filter cut-off as a fraction of Nyquist, in (0, 1]; None: 1."""
    time_limit: float | None = None
    """Wall-clock budget of the run in seconds (nerf): the schedule adapts so it ends in time."""
    support: bool = True
    """nerf: carve the object's support from the projections (support.py); False: train on the whole box."""
    coarse_to_fine: bool = True
    """nerf: train the first iterations on a coarser grid (nerf/levels.py); False: the full grid throughout."""
    use_prior: bool = True
    """nerf: the deep image prior (the generator phase); False: free VM factors from the start (TensoRF)."""
    setting_overrides: tuple[str, ...] = ()
    """nerf: NAME=VALUE pairs setting any NerfConfig field (experiments, ablations); VALUE is JSON
    (0.3, [4, 2], false) or else a plain string. Applied last, checked like every setting."""


def default_method() -> str:
    return "nerf"


def method_settings(opts: ReconstructOptions) -> dict:
    """The settings a method receives: the preset plus what the user set explicitly."""
    settings = {"preset": opts.preset}
    if opts.iterations is not None:
        settings["iterations"] = opts.iterations
    if opts.snapshot_every is not None:
        settings["snapshot_every"] = opts.snapshot_every
    if opts.progress_every is not None:
        settings["eval_every"] = opts.progress_every
    if not opts.kernels:
        settings["use_kernels"] = False
    if opts.tv_weight is not None:
        settings["tv_weight"] = opts.tv_weight
    if opts.fdk_filter is not None:
        settings["filter"] = opts.fdk_filter
    if opts.fdk_cutoff is not None:
        settings["cutoff"] = opts.fdk_cutoff
    if opts.time_limit is not None:
        settings["time_limit_s"] = opts.time_limit
        if opts.iterations is not None:  # with a time limit, --iterations is the most it may plan
            settings["iterations_cap"] = opts.iterations
    if not opts.support:
        settings["support"] = False
    if not opts.coarse_to_fine:
        settings["coarse_levels"] = ()
    if not opts.use_prior:
        settings["use_generator"] = False
    settings.update(parse_setting_overrides(opts.setting_overrides))
    return settings


def parse_setting_overrides(pairs) -> dict:
    """{name: value} from NAME=VALUE strings (VALUE read as JSON when it is JSON, else as text)."""
    out = {}
    for pair in pairs:
        name, sep, text = str(pair).partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ValueError(f"--setting '{pair}': write NAME=VALUE with NAME a nerf setting (nerf/config.py), "
                             "e.g. --setting refine_fraction=0.3")
        try:
            out[name] = json.loads(text)
        except ValueError:
            out[name] = text
    return out


def resolve_device(name: str) -> str:
    import torch

    if name not in DEVICES:
        raise ValueError(f"device '{name}' unknown; use one of {', '.join(DEVICES)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        why = "it was built without CUDA" if torch.version.cuda is None else "it sees no GPU"
        raise MissingDependency(f"--device cuda was asked for but torch {torch.__version__} cannot use a GPU "
                                f"({why}); install a CUDA build of PyTorch, or use --device auto or cpu")
    return name


def adjust_grid(grid: VolumeGrid, spacing: float | None, size) -> VolumeGrid:
    """Apply --grid-spacing / --grid-size to a grid, keeping its box (or its centre when both)."""
    if spacing is not None and spacing <= 0:
        raise ValueError(f"--grid-spacing must be a positive voxel size in mm, got {spacing}")
    if size is not None and (len(size) != 3 or min(size) < 1):
        raise ValueError(f"--grid-size needs three positive voxel counts X Y Z, got {size}")
    if spacing is None and size is None:
        return grid
    lo, hi = grid.bounds()
    centre = (lo + hi) / 2.0
    if size is None:
        return grid.with_spacing(spacing)
    if spacing is None:
        return VolumeGrid.centered(tuple(size), tuple((hi - lo) / np.asarray(size, dtype=float)), tuple(centre))
    return VolumeGrid.centered(tuple(size), (spacing,) * 3, tuple(centre))


def check_output_grid(scan: ScanData, grid: VolumeGrid, grid_source: str, opts: ReconstructOptions):
    """Refuse an output grid that holds a source or that no view sees (another frame or other units)."""
    from .formats.validate import ScanFormatError, grid_problem

    problem = grid_problem(scan.geometry, grid)
    if problem is None:
        return
    if opts.grid_size is not None and grid_source == "field of view":
        raise ScanFormatError("--grid-size", "--grid-size", problem, "give a grid that fits inside the orbit, or "
                              "leave --grid-size out for the field of view every view sees")
    if grid_source == "reference":
        raise ScanFormatError(opts.reference, "--reference", problem + f" of {scan.source_path}",
                              "the reference CT must be in the scan's frame and units (mm; `info DATA` shows them): "
                              "resample it into that frame, or leave --reference out")
    raise ScanFormatError(scan.source_path, "grid", problem,
                          "check the scan's distances and units (mm) and the grid's size and origin")


def check_memory(grid: VolumeGrid, copies: int = 4):
    """Refuse a grid whose few float32 copies would not fit in the available memory."""
    import psutil

    need = grid.n_voxels * 4 * copies
    avail = psutil.virtual_memory().available
    if need > avail:
        raise MemoryError(f"the output grid {grid.shape_xyz} needs about {need / 2**30:.1f} GiB but "
                          f"{avail / 2**30:.1f} GiB are available; give a coarser --grid-spacing or a "
                          "smaller --grid-size")


def classify(exc: BaseException) -> FailureKind:
    """Map an exception to the failure kind of the protocol."""
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return FailureKind.OUT_OF_MEMORY
    if isinstance(exc, (ImportError, MissingDependency)):
        return FailureKind.MISSING_DEPENDENCY
    if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return FailureKind.BAD_INPUT
    from .volume_io import RunFolderWriteError, is_disk_error
    if isinstance(exc, RunFolderWriteError) or is_disk_error(exc):  # disk full, size limit, read-only: the
        return FailureKind.BAD_INPUT  # run folder cannot take the results; the user frees space or moves --out
    return FailureKind.INTERNAL


def failure_message(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: not found; check the path"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def versions() -> dict:
    import SimpleITK
    import torch

    return {"ctnerfrecon": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "numpy": np.__version__,
            "SimpleITK": SimpleITK.Version_VersionString(), "cpu_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


class StopRequest:
    """Cancel: SIGTERM, a first Ctrl-C, or a `cancel` file in the run folder.

    Signal handlers are installed only in the main thread and restored by `restore()`.
    """

    def __init__(self, cancel_file: Path):
        self.cancel_file = cancel_file
        self.event = threading.Event()
        self._saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.event.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.event.set()

    def __call__(self) -> bool:
        if not self.event.is_set() and self.cancel_file.exists():
            self.event.set()
        return self.event.is_set()

    def restore(self):
        for sig, handler in self._saved.items():
            if sig == signal.SIGTERM and self.event.is_set() and handler is signal.SIG_DFL:
                # the run already ended on a stop request and its folder is complete: a late SIGTERM (a
                # client repeating it) must not turn the clean exit into a kill during interpreter shutdown
                handler = signal.SIG_IGN
            signal.signal(sig, handler)
        self._saved.clear()


class Console:
    """What a person at a terminal sees: a tqdm bar on stderr (when it is a terminal) and short lines."""

    def __init__(self, quiet: bool, to_stdout: bool):
        self.quiet = quiet
        self.to_stdout = to_stdout
        self.bar = None
        self.use_bar = not quiet and sys.stderr.isatty()

    def say(self, text: str):
        if self.quiet:
            return
        print(text, file=sys.stdout if self.to_stdout else sys.stderr, flush=True)

    def progress(self, fields: dict):
        if not self.use_bar or fields.get("iteration") is None:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=fields.get("iterations"), file=sys.stderr, unit="it", dynamic_ncols=True)
        self.bar.n = int(fields["iteration"])
        post = {k: fields[k] for k in ("loss", "projection_psnr") if fields.get(k) is not None}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in post.items()}, refresh=False)
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class Prepared:
    """Inputs that passed every check, ready to run."""

    scan: ScanData
    grid: VolumeGrid
    grid_source: str
    reference: Volume | None
    reference_info: dict | None
    method_name: str
    method: object
    device: str
    settings: dict


def prepare(opts: ReconstructOptions) -> Prepared:
    """Load and check everything; raises (ValueError & co.) before any work is done."""
    from .formats import load_scan
    from .fov import default_grid
    from .reference import load_reference

    # every check of the options first, before the method's modules (and torch) load: a typo is
    # refused in a fraction of a second
    name = check_method_name(opts.method or default_method())
    if opts.preset not in PRESETS:
        raise ValueError(f"preset '{opts.preset}' unknown; use one of {', '.join(PRESETS)}")
    if opts.iterations is not None and opts.iterations < 1:
        raise ValueError(f"--iterations must be at least 1, got {opts.iterations}")
    if opts.progress_every is not None and opts.progress_every < 1:
        raise ValueError(f"--progress-every must be a positive number of iterations, got {opts.progress_every}")
    if opts.residuals_every < 0:
        raise ValueError(f"--residuals-every must be 0 (none) or a positive number of seconds, got "
                         f"{opts.residuals_every}")
    if opts.snapshot_every is not None and opts.snapshot_every < 0:
        raise ValueError(f"--snapshot-every must be 0 (no snapshots) or positive, got {opts.snapshot_every}")
    if opts.time_limit is not None:
        if name != "nerf":
            raise ValueError(f"--time-limit applies to --method nerf only, not to '{name}'; leave it out")
        if not (opts.time_limit > 0 and math.isfinite(opts.time_limit)):
            raise ValueError(f"--time-limit must be a positive number of seconds, got {opts.time_limit}")
    if not opts.support and name != "nerf":
        raise ValueError(f"--no-support applies to --method nerf only, not to '{name}'; leave it out")
    for flag, used in (("--no-coarse-to-fine", not opts.coarse_to_fine), ("--no-prior", not opts.use_prior),
                       ("--setting", bool(opts.setting_overrides))):
        if used and name != "nerf":
            raise ValueError(f"{flag} applies to --method nerf only, not to '{name}'; leave it out")
    if opts.setting_overrides:
        from .nerf.config import NerfConfig
        NerfConfig.from_settings(method_settings(opts))  # unknown names and bad values refused here
    if opts.tv_weight is not None:
        if name != "nerf":
            raise ValueError(f"--tv-weight applies to --method nerf only, not to '{name}'; leave it out")
        if not (opts.tv_weight >= 0 and math.isfinite(opts.tv_weight)):
            raise ValueError(f"--tv-weight must be a finite number >= 0 (0: no prior), got {opts.tv_weight}; "
                             "leave it out for the weight derived from the data")
    if opts.fdk_filter is not None or opts.fdk_cutoff is not None:
        if name != "fdk":
            raise ValueError(f"--fdk-filter and --fdk-cutoff apply to --method fdk only, not to '{name}'; "
                             "leave them out or add --method fdk")
        from .fdk import FDKConfig

        FDKConfig(**{k: v for k, v in (("filter", opts.fdk_filter), ("cutoff", opts.fdk_cutoff)) if v is not None})
    # then the data, the reference and the grid, still before torch loads: a broken file is refused in
    # about a second (reading it), not after the method's imports
    scan = load_scan(Path(opts.data), projections=None if opts.projections is None else Path(opts.projections),
                     drop_views=opts.drop_views)
    reference, reference_info = None, None
    if opts.reference is not None:
        reference, units = load_reference(opts.reference, opts.reference_units, opts.mu_water)
        reference_info = {"path": str(Path(opts.reference).absolute()), "units": units,
                          "mu_water": opts.mu_water if units == "hu" else None}
        grid, grid_source = reference.grid, "reference"
    elif scan.grid is not None:
        grid, grid_source = scan.grid, "data"
    elif scan.reference is not None:
        grid, grid_source = scan.reference.grid, "data reference"
    else:
        grid, grid_source = default_grid(scan.geometry), "field of view"
    if reference is None and scan.reference is not None:
        reference, reference_info = scan.reference, {"path": str(scan.source_path), "units": "mu",
                                                     "shipped_with_data": True}
    grid = adjust_grid(grid, opts.grid_spacing, opts.grid_size)
    check_output_grid(scan, grid, grid_source, opts)
    check_memory(grid)
    method = get_method(name)
    device = resolve_device(opts.device)
    settings = method_settings(opts)
    method_memory = getattr(method, "check_memory", None)
    if method_memory is not None:  # the method's own estimate (rays, training grid, batch) against RAM / GPU
        method_memory(scan, grid, dict(settings), device)
    check_resume = getattr(method, "check_resume", None)
    if opts.resume and check_resume is not None:  # a checkpoint that cannot be resumed is refused here
        check_resume(scan, grid, RunContext(device=device, seed=opts.seed, run_dir=RunFolder(opts.out).root,
                                            resume=True, settings=dict(settings)))
    return Prepared(scan, grid, grid_source, reference, reference_info, name, method, device, settings)


def _write_json(path: Path, payload: dict):
    from .events import to_json_value

    text = json.dumps(to_json_value(payload), indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def score(reference: Volume, volume: Volume) -> dict:
    """PSNR / SSIM / NRMSE and structure scores of the volume against the reference."""
    from . import metrics

    result = dict(metrics.score_volumes(reference, volume))
    structure = getattr(metrics, "structure_scores", None)
    if structure is not None:
        result["structures"] = structure(reference, volume)
    return result


def run_reconstruction(opts: ReconstructOptions, stream=None) -> ExitCode:
    """Run one reconstruction into opts.out; returns the exit code.

    Events go to the run folder's log and to `stream`: None means stdout when it is not a terminal,
    False means no stream (a person reads short lines on stdout instead).
    """
    if stream is None:
        stream = sys.stdout if stdout_wants_events() else False
    events = EventWriter(stream or None)
    console = Console(opts.quiet, to_stdout=not stream)
    folder = RunFolder(opts.out)
    stop = StopRequest(folder.cancel_file)
    try:
        try:
            folder.check_usable(opts.resume, opts.overwrite)
            log = folder.open_events_log()
            began = folder.clock()  # a cancel file made from now on is this run's own
        except Exception as exc:  # noqa: BLE001 - the folder is not ours to write: report on the stream only
            return _fail(events, console, exc)
        try:
            prepared = prepare(opts)
        except Exception as exc:  # noqa: BLE001 - refused before any work
            if folder.is_finished():  # keep a finished run's log as it is
                log.close()
            else:
                events.attach_log(log, truncate=not opts.resume)
            return _fail(events, console, exc)
        folder.remove_stale_cancel(older_than=began)
        folder.remove_stale_temporaries()  # half-written files of a killed worker (we hold the lock)
        events.attach_log(log, truncate=not opts.resume)
        return _run(opts, prepared, folder, events, console, stop)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a `failed` event
        return _fail(events, console, exc)
    except KeyboardInterrupt as exc:
        return _fail(events, console, exc)
    finally:
        stop.restore()
        console.close()
        events.close()


def _fail(events: EventWriter, console: Console, exc: BaseException) -> ExitCode:
    kind = FailureKind.INTERNAL if isinstance(exc, KeyboardInterrupt) else classify(exc)
    message = failure_message(exc) if not isinstance(exc, KeyboardInterrupt) else "interrupted"
    console.close()
    if kind is FailureKind.INTERNAL or os.environ.get("CTNERF_DEBUG"):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error ({kind.value}): {message}", file=sys.stderr, flush=True)
    try:
        events.emit("failed", message=message, kind=kind.value)
    except OSError:  # the log cannot take the line (disk full): the stream and stderr had it
        pass
    return kind.exit_code


def _run(opts: ReconstructOptions, p: Prepared, folder: RunFolder, events: EventWriter, console: Console,
         stop: StopRequest) -> ExitCode:
    t0 = time.perf_counter()
    g = p.scan.geometry
    run_info = {"command": "reconstruct", "argv": sys.argv, "options": dataclasses.asdict(opts),
                "method": p.method_name, "device": p.device, "settings": p.settings,
                "data": p.scan.summary(), "grid": {**p.grid.to_dict(), "source": p.grid_source},
                "reference": p.reference_info, "versions": versions(), "status": "running"}
    _write_json(folder.run_json, run_info)
    events.emit("started", views=p.scan.n_views,
                detector={"rows": g.det_shape[0], "cols": g.det_shape[1], "pitch_mm": list(g.pixel_pitch)},
                grid={**p.grid.to_dict(), "source": p.grid_source}, device=p.device, method=p.method_name,
                settings=p.settings, data={"format": p.scan.source_format, "path": p.scan.source_path},
                reference=p.reference_info, resumed=opts.resume, run_dir=folder.root, pid=os.getpid())
    console.say(f"{p.method_name} on {p.device}: {p.scan.n_views} views of {g.det_shape[0]}x{g.det_shape[1]}, "
                f"grid {p.grid.shape_xyz} at {p.grid.spacing_xyz[0]:.3g} mm ({p.grid_source}) -> {folder.root}")
    if p.scan.defects is not None:  # worth a line: the user may not know the panel has them (run.json: notes)
        console.say(f"{int(p.scan.defects.sum())} pixel readings (pixels x views) hold no measurement (dead "
                    "pixels): left out of the fit")

    progress: list[dict] = []
    sequence = folder.last_snapshot_sequence() if opts.resume else 0
    last_iteration = None  # the latest iteration a progress or snapshot report named

    def on_progress(**fields):
        nonlocal last_iteration
        last_iteration = fields.get("iteration", last_iteration)
        fields.setdefault("elapsed_s", round(time.perf_counter() - t0, 3))
        for key in ("iteration", "iterations", "loss", "projection_psnr", "rays_per_batch", "lr", "gpu_mem_mb"):
            fields.setdefault(key, None)
        progress.append(fields)
        events.emit("progress", **fields)
        console.progress(fields)

    from .projection_check import LiveResiduals, suspect_view

    live = LiveResiduals(p.scan, p.device, opts.residuals_every) if opts.residuals_every > 0 else None
    said_suspect = False  # the console names a view standing out while training once; the log has them all

    def on_snapshot(volume: Volume, iteration: int):
        nonlocal sequence, last_iteration, live, said_suspect
        sequence += 1
        last_iteration = iteration
        on_grid = _on_grid(volume, p.grid)
        write_volume(on_grid, folder.snapshot, compress=False)
        events.emit("snapshot", iteration=iteration, sequence=sequence, path=folder.snapshot)
        if live is None or stop() or not live.due():
            return
        try:  # the residual per view while it trains: a bad view shows long before the end
            res = live(on_grid)
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not cost the run; tried once
            console.say(f"residuals during the run skipped: {' '.join(str(exc).split())[:200]}")
            live = None
            return
        events.emit("residuals", iteration=iteration, **{k: res[k] for k in (
            "rmse", "angles_deg", "held_out", "median_rmse", "worst_view", "worst_ratio", "cost_s")})
        suspect = suspect_view(res, opts.drop_views)
        if suspect is not None and not said_suspect:
            said_suspect = True
            console.say(f"residuals at iteration {iteration}: view {suspect} of the data at {res['worst_ratio']:.1f} x "
                        "the median (a bad frame or a geometry error? the check at the end will say)")

    ctx = RunContext(device=p.device, seed=opts.seed, run_dir=folder.root, resume=opts.resume,
                     settings=dict(p.settings), on_progress=on_progress, on_snapshot=on_snapshot,
                     should_stop=stop, on_message=console.say, clock_start=t0)
    volume = _on_grid(p.method.reconstruct(p.scan, p.grid, ctx), p.grid)
    console.close()
    if not np.all(np.isfinite(volume.array)):
        raise RuntimeError(f"method '{p.method_name}' returned a volume with NaN or infinite voxels")
    cancelled = stop()
    if cancelled:  # the protocol's last snapshot, so a client showing snapshots ends on the result
        on_snapshot(volume, last_iteration or 0)
    write_volume(volume, folder.volume)
    paths = {"volume": folder.volume, "events": folder.events, "run": folder.run_json}
    scores = None
    if p.reference is not None:
        scores = score(p.reference, volume)
        _write_json(folder.metrics, scores)
        paths["metrics"] = folder.metrics
    ref_on_grid = None if p.reference is None else resample_to_grid(p.reference, p.grid)
    from .previews import loss_png, projections_png, slices_png

    title = f"{p.method_name} ({p.scan.n_views} views)"
    if scores is not None and "psnr" in scores:
        title += f"  PSNR {scores['psnr']:.2f} dB  SSIM {scores.get('ssim', float('nan')):.3f}"
    paths["preview"] = slices_png(volume, folder.preview, ref_on_grid, title)
    paths["projections_preview"] = projections_png(p.scan.projections, folder.projections_preview)
    if loss_png(progress, folder.loss_preview) is not None:
        paths["loss_preview"] = folder.loss_preview
    if sequence:
        paths["snapshot"] = folder.snapshot
    check = None if cancelled else _projection_check(p, volume, folder, events, console, opts.drop_views)
    if check is not None:
        paths["projection_check"] = check["path"]
        run_info["projection_check"] = {k: check[k] for k in ("view", "angle_deg", "median_rmse", "worst_view",
                                                              "worst_ratio", "stride", "held_out")}
    elapsed = round(time.perf_counter() - t0, 3)
    run_info.update(status="cancelled" if cancelled else "finished", elapsed_s=elapsed, metrics=scores,
                    iteration=last_iteration, method_report=ctx.report)
    _write_json(folder.run_json, run_info)
    events.emit("finished", paths=paths, metrics=scores, cancelled=cancelled, elapsed_s=elapsed,
                iteration=last_iteration)
    console.say(("cancelled" if cancelled else "finished") + f" in {elapsed:.1f} s: {folder.volume}")
    if scores is not None and "psnr" in scores:
        console.say(f"PSNR {scores['psnr']:.2f} dB, SSIM {scores.get('ssim', float('nan')):.3f} "
                    f"against the reference ({folder.metrics})")
    return ExitCode.OK


def _projection_check(p: Prepared, volume: Volume, folder: RunFolder, events: EventWriter, console: Console,
                      dropped: tuple[int, ...]):
    """projection_check.png and the `projection_check` event (projection_check.py); never fails the run."""
    try:
        from .projection_check import projection_check, suspect_view

        title = f"{p.method_name} ({p.scan.n_views} views): rendered through the output volume"
        res = projection_check(volume, p.scan, folder.root / "projection_check.png", device=p.device, title=title)
    except Exception as exc:  # noqa: BLE001 - a diagnostic picture must not cost the run its results
        console.say(f"projection check skipped: {' '.join(str(exc).split())[:200]}")
        return None
    events.emit("projection_check", view=res["view"], angle_deg=res["angle_deg"], rmse=res["rmse"],
                angles_deg=res["angles_deg"], held_out=res["held_out"], median_rmse=res["median_rmse"],
                worst_view=res["worst_view"], path=res["path"])
    suspect = suspect_view(res, dropped)
    if suspect is not None:
        # the check numbers the views the run kept; the hint names the data's, with those already left out
        named = f"view {res['worst_view']}" + (f" (view {suspect} of the data)" if dropped else "")
        views = " ".join(str(v) for v in sorted({*dropped, suspect}))
        console.say(f"projection check: {named} leaves {res['worst_ratio']:.1f} x the median residual (a bad view "
                    f"or a geometry error?): {res['path']}; if that frame is bad, `--drop-views {views}` leaves it out")
    return res


def _on_grid(volume: Volume, grid: VolumeGrid) -> Volume:
    """The method's volume on the output grid, as float32 (resampled if it used another grid)."""
    same = (volume.grid.shape_xyz == grid.shape_xyz and np.allclose(volume.grid.spacing_xyz, grid.spacing_xyz)
            and np.allclose(volume.grid.origin_xyz, grid.origin_xyz)
            and np.allclose(volume.grid.direction, grid.direction))
    if not same:
        volume = resample_to_grid(volume, grid)
    return Volume(np.ascontiguousarray(volume.array, dtype=np.float32), grid)
