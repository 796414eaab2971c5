"""nerf checkpoints: written atomically, read back with a loader that builds nothing but tensors.

A checkpoint is a torch zip file whose pickle holds only tensors, numbers, strings, None and
plain lists/tuples/dicts. It is read with ``torch.load(weights_only=True)``: a file that asks for
any other global (a function such as ``os.system``, a class, a numpy object) is refused before
anything is called. After loading, the content is checked field by field (a tampered or truncated
file never reaches the model as a ``KeyError``), and then against the run that wants to resume:
the same checkpoint format version, the same data (a fingerprint of projections and geometry),
the same training grid, model settings and seed. Every refusal is a ScanFormatError naming the
checkpoint, the field and the fix, raised before the worker starts any work.
"""
from __future__ import annotations

import hashlib
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..formats.validate import ScanFormatError

FORMAT = "ctnerf-nerf-checkpoint"
VERSION = 2
"""Bumped whenever the content changes meaning; version 1 was the unversioned full-pickle file."""

MODEL_FIELDS = ("channels", "plane_resolution", "generator_width", "noise_channels", "use_generator",
                "detail_grid", "voxel_size", "max_training_voxels")
"""NerfConfig fields that shape the model's tensors and the training grid: they must match on
resume. The schedule (iterations, snapshot/progress cadence...) may change: --resume with more
--iterations continues a finished or cancelled run."""

_FIX_NEW = ("start a new run folder (another --out), or pass --overwrite instead of --resume to start "
            "this one again")


def _refuse(path, field: str, problem: str, fix: str = _FIX_NEW) -> ScanFormatError:
    return ScanFormatError(path, field, problem, fix)


# -- fingerprint of the data ---------------------------------------------------------------------
def data_fingerprint(scan) -> str:
    """A digest of the projections and the geometry: a checkpoint resumes only on the same data."""
    h = hashlib.blake2b(digest_size=16)
    proj = np.ascontiguousarray(scan.projections, dtype=np.float32)
    h.update(repr(proj.shape).encode())
    h.update(memoryview(proj).cast("B"))
    g = scan.geometry
    for name in ("sources", "det_centers", "det_u", "det_v"):
        arr = np.ascontiguousarray(getattr(g, name), dtype=np.float64)
        h.update(name.encode())
        h.update(memoryview(arr).cast("B"))
    h.update(repr((tuple(int(s) for s in g.det_shape), tuple(float(p) for p in g.pixel_pitch),
                   bool(g.parallel))).encode())
    return h.hexdigest()


# -- writing ---------------------------------------------------------------------------------------
def plain(value):
    """Tensors stay; numpy arrays become tensors; numpy scalars Python numbers; tuples stay tuples."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu() if value.device.type != "cpu" else value.detach()
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if value is None or isinstance(value, (int, float, str, complex)):
        return value
    raise TypeError(f"a checkpoint holds only tensors and plain data, not {type(value).__name__}")


def save_checkpoint(path, payload: dict) -> Path:
    """Write `payload` (plus the format tag and version) to `path` atomically (temp, fsync, rename)."""
    from ..volume_io import atomic_write

    content = {"format": FORMAT, "version": VERSION, **plain(payload)}
    return atomic_write(path, lambda tmp: torch.save(content, tmp))


# -- reading ---------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _tensor_dict(value, path, field: str, allow_none: bool = False):
    if value is None and allow_none:
        return
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                              for k, t in value.items()):
        raise _refuse(path, field, "is not a mapping of parameter names to tensors (tampered or from another "
                      "program)")


def _check_optimizer(value, path):
    ok = (isinstance(value, dict) and isinstance(value.get("state"), dict)
          and isinstance(value.get("param_groups"), list)
          and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in value["param_groups"]))
    if ok:
        for st in value["state"].values():
            if not isinstance(st, dict):
                ok = False
                break
    if not ok:
        raise _refuse(path, "optimizer", "is not an optimizer state (tampered or from another program)")


def _check_content(ck, path):
    """Types and ranges of every field the trainer reads."""
    if not isinstance(ck, dict):
        raise _refuse(path, "checkpoint", f"holds a {type(ck).__name__}, not a checkpoint")
    fmt, version = ck.get("format"), ck.get("version")
    if fmt != FORMAT or not _is_int(version):
        raise _refuse(path, "version", "was written by an older version of CTNeRFRecon (no format tag) or by "
                      "another program; it cannot be resumed safely")
    if version != VERSION:
        raise _refuse(path, "version", f"has checkpoint version {version}; this CTNeRFRecon reads version {VERSION}")
    required = ("iteration", "history", "elapsed_s", "rays_cap", "phase", "factors", "field", "detail",
                "optimizer", "config", "grid", "seed", "data")
    for key in required:
        if key not in ck:
            raise _refuse(path, key, "required field is missing (tampered or truncated checkpoint)")
    if not _is_int(ck["iteration"]) or ck["iteration"] < 0:
        raise _refuse(path, "iteration", f"is {ck['iteration']!r:.40}, not an iteration count")
    if not _is_int(ck["rays_cap"]) or ck["rays_cap"] < 1:
        raise _refuse(path, "rays_cap", f"is {ck['rays_cap']!r:.40}, not a positive ray count")
    if not _is_num(ck["elapsed_s"]) or not math.isfinite(ck["elapsed_s"]) or ck["elapsed_s"] < 0:
        raise _refuse(path, "elapsed_s", f"is {ck['elapsed_s']!r:.40}, not a time in seconds")
    if not _is_int(ck["seed"]):
        raise _refuse(path, "seed", f"is {ck['seed']!r:.40}, not an integer seed")
    if ck["phase"] not in ("generator", "direct"):
        raise _refuse(path, "phase", f"is {ck['phase']!r:.40}, expected 'generator' or 'direct'")
    hist = ck["history"]
    if not isinstance(hist, list) or not all(isinstance(r, (list, tuple)) and len(r) == 4
                                             and all(_is_num(x) for x in r) for r in hist):
        raise _refuse(path, "history", "is not a list of (iteration, loss, psnr, seconds) rows")
    _tensor_dict(ck["factors"], path, "factors")
    _tensor_dict(ck["field"], path, "field")
    _tensor_dict(ck["detail"], path, "detail", allow_none=True)
    _check_optimizer(ck["optimizer"], path)
    if not isinstance(ck["config"], dict) or not all(isinstance(k, str) for k in ck["config"]):
        raise _refuse(path, "config", "is not a mapping of settings")
    g = ck["grid"]
    if not (isinstance(g, dict) and all(k in g for k in ("shape_xyz", "spacing_xyz", "origin_xyz"))):
        raise _refuse(path, "grid", "is not a grid (shape_xyz, spacing_xyz, origin_xyz)")
    if not isinstance(ck["data"], str):
        raise _refuse(path, "data", "is not a data fingerprint")
    sup = ck.get("support")  # optional: checkpoints written before it was kept have none
    if sup is not None and not (isinstance(sup, dict) and isinstance(sup.get("mask"), torch.Tensor)
                                and sup["mask"].dtype == torch.uint8 and sup["mask"].dim() == 1):
        raise _refuse(path, "support", "is not a carved support (a bit-packed mask and its grid)")


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load and check a checkpoint: only tensors and plain data, every field of the right type."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _refuse(path, "checkpoint", f"cannot be read ({exc.strerror or exc})",
                      "check the run folder's permissions") from None
    if size == 0:
        raise _refuse(path, "checkpoint", "is empty (a write that never completed)")
    _check_archive(path, size)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = " ".join(str(exc).split())
        asked = _asked_global(text)
        if asked or "weights only" in text.lower() or "weights_only" in text:
            what = f"asks for '{asked}'" if asked else "asks for something other than tensors and plain data"
            raise _refuse(path, "checkpoint", f"{what}; it was refused and nothing in it was run",
                          "only resume run folders you made yourself; " + _FIX_NEW) from None
        raise _refuse(path, "checkpoint", "is truncated or corrupt (its pickle cannot be read)") from None
    except Exception:  # noqa: BLE001 - the tensors-only loader ran nothing: any failure is a broken file
        # torch's own words here speak of miniz internals; the user needs to know the file is broken
        what = "is truncated or corrupt (" + ("its zip archive is incomplete or damaged" if _zip_head(path)
                                              else "it is not a torch checkpoint archive") + ")"
        raise _refuse(path, "checkpoint", what) from None
    _check_content(ck, path)
    return ck


def _check_archive(path: Path, size: int):
    """Refuse, before torch reads it, an archive whose entries announce more than memory can take or
    more than their compressed bytes can inflate to (torch writes entries uncompressed)."""
    import psutil

    if not _zip_head(path):
        return  # not a zip: torch.load refuses it below
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, OverflowError):
        raise _refuse(path, "checkpoint", "is truncated or corrupt (its zip archive is incomplete or damaged)") from None
    total = sum(max(0, i.file_size) for i in infos)
    avail = psutil.virtual_memory().available
    if total > avail:
        raise _refuse(path, "checkpoint", f"announces {total / 2**30:.3g} GiB of content, more than the "
                      f"{avail / 2**30:.1f} GiB of memory available; refused before reading")
    if any(i.file_size > 1100 * max(i.compress_size, 1) + 65536 for i in infos):
        raise _refuse(path, "checkpoint", "has an entry that announces more bytes than its compressed data can "
                      "inflate to (a decompression bomb, or a damaged archive); refused before reading")


def _zip_head(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _asked_global(text: str) -> str | None:
    """The global a refused pickle asked for, from torch's message ('Unsupported global: GLOBAL x.y')."""
    marker = "GLOBAL "
    i = text.find(marker)
    if i < 0:
        return None
    name = text[i + len(marker):].split()[0].strip("'\".,:;")
    return name[:80] or None


def _same_grid(a: dict, b: dict) -> bool:
    try:
        return (list(map(int, a["shape_xyz"])) == list(map(int, b["shape_xyz"]))
                and np.allclose(np.asarray(a["spacing_xyz"], float), np.asarray(b["spacing_xyz"], float), rtol=1e-9, atol=1e-9)
                and np.allclose(np.asarray(a["origin_xyz"], float), np.asarray(b["origin_xyz"], float), rtol=1e-9, atol=1e-6)
                and np.allclose(np.asarray(a.get("direction", np.eye(3)), float),
                                np.asarray(b.get("direction", np.eye(3)), float), atol=1e-9))
    except (TypeError, ValueError, KeyError):
        return False


def check_matches(ck: dict, path, *, fingerprint: str, grid: dict, config: dict, seed: int):
    """Refuse a checkpoint made for other data, another training grid, other model settings or seed."""
    if ck["data"] != fingerprint:
        raise _refuse(path, "data", "was made from other data (the projections or geometry changed since)",
                      "resume with the data (and the --drop-views) the run started from (its run.json says), or "
                      + _FIX_NEW)
    if not _same_grid(ck["grid"], grid):
        raise _refuse(path, "grid", f"was made for the training grid {list(ck['grid'].get('shape_xyz', []))}, "
                      f"this run's is {list(grid['shape_xyz'])}",
                      "resume with the same --grid-spacing/--grid-size/--reference as the run it continues, or "
                      + _FIX_NEW)
    changed = [k for k in MODEL_FIELDS if k in config and ck["config"].get(k) != config[k]]
    if changed:
        was = ", ".join(f"{k}={ck['config'].get(k)!r} (now {config[k]!r})" for k in changed[:4])
        raise _refuse(path, "config", f"was made with other model settings: {was}",
                      "resume with the same --preset and settings as the run it continues, or " + _FIX_NEW)
    if ck["seed"] != seed:
        raise _refuse(path, "seed", f"was made with --seed {ck['seed']}, this run has --seed {seed}",
                      f"resume with --seed {ck['seed']}, or " + _FIX_NEW)


# -- the trainer's state ---------------------------------------------------------------------------
def _fingerprint_of(trainer) -> str:
    fp = getattr(trainer, "_data_fingerprint", None)
    if fp is None:
        fp = data_fingerprint(trainer.scan)
        trainer._data_fingerprint = fp
    return fp


def save_trainer(trainer, path) -> Path:
    """Write a NerfTrainer's state (model, optimiser, schedule position, what it was made for)."""
    from dataclasses import asdict

    s = trainer.state
    payload = dict(iteration=s.iteration, history=[list(r) for r in s.history], elapsed_s=float(s.elapsed_s),
                   rays_cap=int(s.rays_per_batch_cap), phase=trainer.phase,
                   factors=trainer.factors.state_dict(), field=trainer.field.state_dict(),
                   detail=None if trainer.detail is None else trainer.detail.state_dict(),
                   optimizer=trainer.optimizer.state_dict(), config=asdict(trainer.cfg),
                   grid=trainer.grid.to_dict(), seed=int(trainer.ctx.seed), data=_fingerprint_of(trainer),
                   support=None if trainer.support is None else trainer.support.to_plain())
    return save_checkpoint(path, payload)


def support_of(ck: dict, path):
    """The carved support a checkpoint holds (support.py's Support), or None when it holds none (written
    before it was kept, or nothing was carved); a broken one is refused (ScanFormatError)."""
    value = ck.get("support")
    if value is None:
        return None
    from ..support import Support

    try:
        return Support.from_plain(value)
    except ValueError as exc:
        raise _refuse(path, "support", f"{exc} (tampered or truncated checkpoint)") from None


def check_trainer_checkpoint(ck: dict, path, scan, grid, cfg, seed: int, fingerprint: str | None = None):
    """check_matches for a run of `cfg` on `scan` with training grid `grid`."""
    from dataclasses import asdict

    check_matches(ck, path, fingerprint=fingerprint or data_fingerprint(scan), grid=grid.to_dict(),
                  config=asdict(cfg), seed=int(seed))


def restore_trainer(trainer, path, ck: dict | None = None) -> None:
    """Read `path`, check it against the trainer's run, and load it into the trainer. `ck`: the
    checkpoint of `path` already read with read_checkpoint (the field export needs its configuration
    before a trainer exists), so it is not read a second time."""
    if ck is None:
        ck = read_checkpoint(path, map_location=trainer.device)
    check_trainer_checkpoint(ck, path, trainer.scan, trainer.grid, trainer.cfg, trainer.ctx.seed,
                             _fingerprint_of(trainer))
    try:
        if ck["phase"] == "direct" and trainer.phase != "direct":
            trainer.switch_to_direct()
        trainer.factors.load_state_dict(ck["factors"])
        if ck["detail"] is not None and trainer.detail is not None:
            trainer.detail.load_state_dict(ck["detail"])
        trainer.field.load_state_dict(ck["field"])
        trainer.optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise _refuse(path, "factors", f"does not fit this run's model ({text})") from None
    trainer.state.iteration = int(ck["iteration"])
    trainer.state.history = [tuple(r) for r in ck["history"]]
    trainer.state.elapsed_s = float(ck["elapsed_s"])
    trainer.state.rays_per_batch_cap = int(ck["rays_cap"])
    trainer._update_level(trainer.state.iteration)  # the coarse-to-fine level of that iteration (levels.py)
