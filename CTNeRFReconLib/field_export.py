"""A run's reconstruction as a continuous function: evaluate it in any box, at any voxel size.

The nerf method's result is not a voxel grid but a field: TensoRF-VM planes and lines, a decoder and a
detail grid (nerf/field.py, nerf/detail.py), zero outside the object's support. `load_run_field`
rebuilds that field from a run folder's checkpoint.pt (finished, cancelled or still running: the
checkpoint is written atomically, so the latest complete one is read) and `RunField.on_grid`
evaluates it on any grid, e.g. a small box around a structure at a quarter of the output voxel
size, without retraining. This is the "arbitrary-scale output" of implicit neural representations
(e.g. NAF, Zha et al., MICCAI 2022; SAX-NeRF, Cai et al., CVPR 2024): the field is queried at the
new sample positions instead of interpolating voxels of the exported volume.

How the field is rebuilt. The checkpoint holds tensors and plain data only and is read with the
checkpoint module's tensors-only loader (nerf/checkpoint.py: ``torch.load(weights_only=True)``,
every field checked). Two things the field depends on are not tensors of the checkpoint: the
decoder's attenuation scale and the object's support, both derived from the projections. They are
recomputed from the run's data (run.json names it) by the trainer's own code: a NerfTrainer is
built for the run's data, output grid, settings and seed, and the checkpoint is restored into it
with the same checks as ``--resume`` (same data fingerprint, training grid, model settings, seed).
So the exported field is exactly the one the run would export itself.

Where that is impossible (an FDK run has no checkpoint; the checkpoint is refused by the safe loader;
the run's data were moved or changed), the
run's volume (volume.nrrd, else the latest snapshot.nrrd) is resampled trilinearly instead, and
`RunField.note` says so; that adds no detail beyond the run's own voxels.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import Volume
from .formats.validate import ScanFormatError
from .geometry import VolumeGrid

SLAB_VOXELS = 1 << 23
"""A grid is evaluated in slabs of z-planes of about this many voxels (bounds the working memory)."""
MAX_EXPORT_VOXELS = 1 << 30
"""Refused above this many voxels (4 GiB of float32): a box or voxel size typed wrongly."""
VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".nii", ".nii.gz")


@dataclass
class RunField:
    """A run's attenuation (1/mm) as a function of scanner-frame position."""

    run_dir: Path
    source: str
    """'checkpoint' (the trained field) or 'volume' (resampling the run's volume file)."""
    output_grid: VolumeGrid
    """The run's own output grid (volume.nrrd's)."""
    note: str
    """One line saying what is evaluated (and, for 'volume', why not the field)."""
    iteration: int | None = None
    """The checkpoint's iteration ('checkpoint' only)."""
    trainer: object = None
    volume: Volume | None = None
    extra: dict = field(default_factory=dict)

    @property
    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """World box (lo, hi) where the reconstruction can be non-zero."""
        if self.trainer is not None:
            lo, hi = self.trainer.grid.bounds()
        else:
            lo, hi = self.volume.grid.bounds()
        return np.asarray(lo, float), np.asarray(hi, float)

    def on_grid(self, grid: VolumeGrid) -> Volume:
        """The reconstruction on any grid (z, y, x), float32, zero outside its box and support."""
        if self.trainer is None:
            from .volume_io import resample_to_grid

            return resample_to_grid(self.volume, grid)
        out = np.zeros(grid.shape_zyx, dtype=np.float32)
        nx, ny, nz = grid.shape_xyz
        per = max(1, SLAB_VOXELS // max(1, nx * ny))
        m = grid.index_to_world_matrix()
        for z0 in range(0, nz, per):
            z1 = min(nz, z0 + per)
            origin = m[:3, :3] @ np.array([0.0, 0.0, z0]) + m[:3, 3]
            slab = VolumeGrid((nx, ny, z1 - z0), grid.spacing_xyz, tuple(origin), grid.direction)
            out[z0:z1] = self.trainer.volume_on(slab).cpu().numpy()
        return Volume(out, grid)

    def support_mask_on(self, grid: VolumeGrid) -> np.ndarray | None:
        """The carved object support on `grid` (bool), or None when the run has none."""
        support = getattr(self.trainer, "support", None)
        if support is None or not getattr(support, "found", False):
            return None
        return support.mask_on(grid)


def _refuse(path, fld: str, problem: str, fix: str) -> ScanFormatError:
    return ScanFormatError(path, fld, problem, fix)


def read_run_json(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _refuse(path, "run.json", f"cannot be read ({exc})",
                      "give a run folder written by `reconstruct` (its run.json is damaged)") from None


def check_run_dir(run_dir) -> Path:
    """The run folder, or a refusal when it is not one (before any work)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise _refuse(run_dir, "RUN_DIR", "not found", "give the folder a `reconstruct` run wrote (its --out)")
    if not run_dir.is_dir():
        raise _refuse(run_dir, "RUN_DIR", "is a file, not a run folder",
                      "give the folder a `reconstruct` run wrote (its --out), not a file in it")
    if not any((run_dir / n).is_file() for n in ("checkpoint.pt", "volume.nrrd", "snapshot.nrrd")):
        raise _refuse(run_dir, "RUN_DIR", "holds no reconstruction yet (no checkpoint.pt, volume.nrrd or "
                      "snapshot.nrrd)", "wait for the run's first snapshot or checkpoint, or give another run folder")
    return run_dir


def output_grid_of(run_dir: Path, info: dict | None) -> VolumeGrid | None:
    if info and isinstance(info.get("grid"), dict):
        try:
            return VolumeGrid.from_dict(info["grid"])
        except (KeyError, TypeError, ValueError):
            return None
    return None


def _volume_fallback(run_dir: Path, why: str) -> RunField:
    from .volume_io import read_volume

    for name in ("volume.nrrd", "snapshot.nrrd"):
        path = run_dir / name
        if path.is_file():
            vol = read_volume(path)
            note = f"resampling {name} trilinearly ({why}): no detail beyond the run's own voxels"
            return RunField(run_dir, "volume", vol.grid, note, volume=vol)
    raise _refuse(run_dir, "RUN_DIR", f"has no volume to fall back on ({why})",
                  "wait for the run's first snapshot, or give another run folder")


def load_run_field(run_dir, device: str = "cpu", allow_fallback: bool = True) -> RunField:
    """The run's reconstruction as a field (see the module docstring): the trained field from
    checkpoint.pt, else (allow_fallback) the run's volume resampled."""
    run_dir = check_run_dir(run_dir)
    ck_path = run_dir / "checkpoint.pt"
    if not ck_path.is_file():
        return _volume_fallback(run_dir, "the run has no checkpoint: its method is not a field (FDK) or it "
                                "has not saved one yet")
    info = read_run_json(run_dir)
    try:
        return _trained_field(run_dir, ck_path, info, device)
    except _NoField as exc:
        if not allow_fallback:
            raise _refuse(ck_path, exc.fld, exc.problem, exc.fix) from None
        return _volume_fallback(run_dir, exc.problem)


class _NoField(Exception):
    def __init__(self, fld: str, problem: str, fix: str):
        super().__init__(problem)
        self.fld, self.problem, self.fix = fld, problem, fix


def _trained_field(run_dir: Path, ck_path: Path, info: dict | None, device: str) -> RunField:
    from dataclasses import fields as dc_fields

    from .methods import RunContext
    from .nerf.checkpoint import read_checkpoint, restore_trainer, support_of
    from .nerf.config import NerfConfig
    from .nerf.train import NerfTrainer, reuse_support

    try:
        ck = read_checkpoint(ck_path, map_location="cpu")  # tensors only, every field checked; nothing is run
    except ScanFormatError as exc:
        raise _NoField(exc.field, f"its checkpoint was refused ({exc.problem})", exc.fix) from None
    out_grid = output_grid_of(run_dir, info)
    options = (info or {}).get("options") or {}
    if out_grid is None or not options.get("data"):
        raise _NoField("run.json", "run.json does not say which data and output grid the run used",
                       "export from a run folder written by `reconstruct`")
    from .formats import load_scan

    data, proj = options.get("data"), options.get("projections")
    try:
        scan = load_scan(Path(data), projections=None if not proj else Path(proj),
                         drop_views=tuple(options.get("drop_views") or ()))  # the views the run was fitted to
    except (ValueError, OSError) as exc:
        raise _NoField("data", f"the run's data {data} cannot be read now ({' '.join(str(exc).split())[:200]}); "
                       "the field's attenuation scale and support come from it",
                       "put the run's data back where run.json says") from None
    known = {f.name for f in dc_fields(NerfConfig)}
    cfg = NerfConfig(**{k: v for k, v in ck["config"].items() if k in known})
    try:
        reuse_support(scan, out_grid, cfg, support_of(ck, ck_path))  # the trained support, not carved again
    except ScanFormatError as exc:
        raise _NoField(exc.field, exc.problem, exc.fix) from None
    ctx = RunContext(device=device, seed=int(ck["seed"]), run_dir=run_dir)
    trainer = NerfTrainer(scan, out_grid, cfg, ctx)
    try:
        restore_trainer(trainer, ck_path, ck)
    except ScanFormatError as exc:
        raise _NoField(exc.field, exc.problem, exc.fix) from None
    trainer.factors.eval()
    note = (f"the trained field of {ck_path} (iteration {trainer.state.iteration}, "
            f"{trainer.phase} phase{', with detail grid' if trainer.detail is not None else ''})")
    return RunField(run_dir, "checkpoint", out_grid, note, iteration=int(trainer.state.iteration), trainer=trainer)


# -- export boxes -----------------------------------------------------------------------------------
def roi_grid(centre_xyz, size_xyz, spacing, where: str = "--roi") -> VolumeGrid:
    """An axis-aligned grid covering the box (centre, size in mm, scanner frame) at `spacing` mm.

    The voxel counts are round(size / spacing) (at least 1); the spacing is kept exactly, so the box
    may differ from the one asked for by less than a voxel on each axis."""
    centre = np.asarray(centre_xyz, dtype=float).reshape(-1)
    size = np.asarray(size_xyz, dtype=float).reshape(-1)
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    if centre.size != 3 or size.size != 3 or not np.all(np.isfinite(centre)) or not np.all(np.isfinite(size)):
        raise _refuse(where, where, f"needs six finite numbers CX CY CZ SX SY SZ, got {centre.tolist() + size.tolist()}",
                      "give the box's centre and size in mm in the scanner frame")
    if np.any(size <= 0):
        raise _refuse(where, where, f"has a size that is not positive ({size.tolist()})",
                      "give the box's size SX SY SZ in mm, each > 0")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise _refuse("--spacing", "--spacing", f"is {sp.tolist()}, not a positive voxel size",
                      "give the voxel size in mm, > 0")
    shape = np.maximum(1, np.round(size / sp)).astype(int)
    n = int(np.prod(shape.astype(np.int64)))
    if n > MAX_EXPORT_VOXELS:
        raise _refuse(where, "--spacing", f"asks for {shape.tolist()} = {n:.3g} voxels ({n * 4 / 2**30:.1f} GiB)",
                      "give a larger --spacing or a smaller --roi")
    return VolumeGrid.centered(tuple(int(k) for k in shape), tuple(float(s) for s in sp), tuple(centre))


def check_overlap(grid: VolumeGrid, box, where: str = "--roi"):
    lo, hi = grid.bounds()
    blo, bhi = box
    if np.any(hi <= blo) or np.any(lo >= bhi):
        raise _refuse(where, where, f"box {np.round(lo, 2).tolist()} to {np.round(hi, 2).tolist()} mm lies outside "
                      f"the reconstruction's box {np.round(blo, 2).tolist()} to {np.round(bhi, 2).tolist()} mm",
                      "give a centre and size in the scanner frame (mm), as volume.nrrd's origin and spacing are")


def check_out_path(out, overwrite: bool, suffixes=VOLUME_SUFFIXES, what: str = "volume") -> Path:
    out = Path(out)
    name = out.name.lower()
    if not any(name.endswith(s) for s in suffixes):
        raise _refuse(out, "--out", f"has an extension this command does not write (a {what} file ends in "
                      f"{', '.join(suffixes)})", f"give a file name ending in {suffixes[0]}")
    if out.is_dir():
        raise _refuse(out, "--out", "is a folder", "give a file name")
    if out.exists() and not overwrite:
        raise _refuse(out, "--out", "exists already", "choose another file name, or pass --overwrite to replace it")
    return out


def check_box_request(run_dir: Path, centre_xyz, size_xyz, spacing) -> None:
    """Refuse, before the field is loaded, a voxel size that is not positive, half a box, or a box
    (centre and size, mm, scanner frame) that misses the run's output grid (export and surface)."""
    if spacing is not None and not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
        raise _refuse("--spacing", "--spacing", f"is {spacing!r}, not a positive voxel size", "give the voxel size in mm, > 0")
    if (centre_xyz is None) != (size_xyz is None):
        raise _refuse("--roi", "--roi", "needs both the centre and the size", "give CX CY CZ SX SY SZ")
    run_grid = output_grid_of(run_dir, read_run_json(run_dir))
    if centre_xyz is not None:
        probe_sp = spacing or (float(min(run_grid.spacing_xyz)) if run_grid is not None else 1.0)
        probe = roi_grid(centre_xyz, size_xyz, probe_sp)  # the numbers are checked before loading
        if run_grid is not None:
            check_overlap(probe, run_grid.bounds())


def box_grid(rf, centre_xyz, size_xyz, spacing) -> VolumeGrid:
    """The grid to evaluate a loaded run field on: the box given, else the run's output box, at the
    voxel size given, else the output grid's smallest."""
    base = rf.output_grid
    sp = spacing or float(min(base.spacing_xyz))
    if centre_xyz is None:
        lo, hi = base.bounds()
        centre_xyz, size_xyz = (lo + hi) / 2.0, hi - lo
    grid = roi_grid(centre_xyz, size_xyz, sp)
    check_overlap(grid, base.bounds())
    return grid


def export_region(run_dir, out, centre_xyz=None, size_xyz=None, spacing=None, overwrite: bool = False,
                  device: str = "cpu", on_message=lambda text: None) -> dict:
    """Evaluate the run's field (or its volume) in a box at a voxel size and write it atomically.

    Defaults: the run's output box, at the output grid's smallest spacing. Everything is checked
    before any work (bad numbers, an existing --out, a box outside the reconstruction)."""
    import time

    from .volume_io import write_volume

    t0 = time.perf_counter()
    run_dir = check_run_dir(run_dir)
    out = check_out_path(out, overwrite)
    check_box_request(run_dir, centre_xyz, size_xyz, spacing)
    rf = load_run_field(run_dir, device=device)
    on_message(f"evaluating {rf.note}")
    grid = box_grid(rf, centre_xyz, size_xyz, spacing)
    t1 = time.perf_counter()
    vol = rf.on_grid(grid)
    t2 = time.perf_counter()
    write_volume(vol, out)
    t3 = time.perf_counter()
    return dict(path=str(Path(out).absolute()), source=rf.source, note=rf.note, iteration=rf.iteration,
                grid=grid.to_dict(), seconds=dict(load=round(t1 - t0, 3), evaluate=round(t2 - t1, 3),
                                                  write=round(t3 - t2, 3), total=round(t3 - t0, 3)))
