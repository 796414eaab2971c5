"""R2-Gaussian case folders: meta_data.json + proj_train/*.npy (+ vol_gt.npy).

R2-Gaussian's generator (``data_generator/synthetic_dataset/generate_data.py``) projects with TIGRE
exactly as NAF does: its "scanner" block lists nVoxel/sVoxel/dVoxel/offOrigin as [x, y, z],
nDetector/sDetector/dDetector as [v, u], offDetector as [u, v]; each proj_*.npy is one
``tigre.Ax(vol.transpose(2, 1, 0))[:, ::-1, :]`` image (rows, cols; row 0 at the top) and vol_gt.npy
is vol[x, y, z]. Its lengths are in the scanner's own unit (a unit cube scene for the synthetic
set) and the projections are line integrals in that unit; we take that unit as mm, so the
reference volume needs no rescaling.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data import ScanData, Volume
from .tigre import tigre_geometry, tigre_grid
from .validate import (ScanFormatError, as_float_array, check_exists, check_geometry, check_projections,
                       load_npy, require)


def _read_json(path: Path) -> dict:
    check_exists(path, "meta_data.json")
    try:
        if path.stat().st_size > 64 << 20:
            raise ValueError("the file is larger than 64 MiB")
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ScanFormatError(path, "json", f"is not valid JSON ({' '.join(str(exc).split())[:200]})",
                              "the file is truncated or corrupt; regenerate it") from None
    if not isinstance(meta, dict):
        raise ScanFormatError(path, "json", "top level is not an object", "store a JSON object")
    return meta


def _sized(scanner, n_key, d_key, s_key, file):
    n = as_float_array(require(scanner, n_key, file, where="scanner."), file, f"scanner.{n_key}", positive=True)
    if scanner.get(d_key) is not None:
        return n, as_float_array(scanner[d_key], file, f"scanner.{d_key}", shape=n.shape, positive=True)
    s = as_float_array(require(scanner, s_key, file, where="scanner.",
                               fix=f"give scanner.{d_key} or scanner.{s_key}"), file, f"scanner.{s_key}",
                       shape=n.shape, positive=True)
    return n, s / n


def _load_split(folder: Path, meta: dict, key: str, file: Path, geo_kw):
    entries = require(meta, key, file)
    if not isinstance(entries, list) or not entries:
        raise ScanFormatError(file, key, "is empty or not a list", "list {file_path, angle} per projection")
    images, angles = [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ScanFormatError(file, f"{key}[{i}]", "is not an object", "give {file_path, angle}")
        rel = require(e, "file_path", file, where=f"{key}[{i}].")
        ang = as_float_array(require(e, "angle", file, where=f"{key}[{i}]."), file, f"{key}[{i}].angle")
        p = check_exists(folder / rel, f"{key}[{i}].file_path", "projection file")
        img = load_npy(p, f"{key}[{i}].file_path", "the file is truncated or not a numpy array; regenerate it")
        if img.ndim != 2:
            raise ScanFormatError(p, f"{key}[{i}]", f"has shape {img.shape}, expected (rows, cols)",
                                  "store one 2D projection per file")
        if images and img.shape != images[0].shape:
            raise ScanFormatError(p, f"{key}[{i}]", f"has shape {img.shape}, the first has {images[0].shape}",
                                  "all projections must have the same size")
        images.append(img)
        angles.append(float(ang.reshape(-1)[0]))
    proj = check_projections(np.stack(images), file, key)
    geom = tigre_geometry(angles=np.asarray(angles), file=file, row_up=False, **geo_kw)
    if tuple(proj.shape[1:]) != geom.det_shape:
        raise ScanFormatError(file, "scanner.nDetector", f"says {list(geom.det_shape)} [v, u] but the "
                              f"{key} images are {list(proj.shape[1:])}", "nDetector is [rows, cols]")
    return proj, geom


def load_r2gaussian(path) -> ScanData:
    """Load an R2-Gaussian folder (or its meta_data.json)."""
    path = Path(path)
    file = path / "meta_data.json" if path.is_dir() else path
    folder = file.parent
    meta = _read_json(file)
    scanner = require(meta, "scanner", file)
    nvox, dvox = _sized(scanner, "nVoxel", "dVoxel", "sVoxel", file)
    ndet, ddet = _sized(scanner, "nDetector", "dDetector", "sDetector", file)
    off_uv = as_float_array(scanner.get("offDetector", [0.0, 0.0]), file, "scanner.offDetector").reshape(-1)
    if off_uv.size < 2:
        raise ScanFormatError(file, "scanner.offDetector", "needs [u, v]", "give two offsets in the scanner's unit")
    geo_kw = dict(DSD=require(scanner, "DSD", file, where="scanner."),
                  DSO=require(scanner, "DSO", file, where="scanner."), nDetector=ndet, dDetector=ddet,
                  offDetector=[off_uv[1], off_uv[0]], mode=str(scanner.get("mode", "cone")))
    proj, geom = _load_split(folder, meta, "proj_train", file, geo_kw)
    offo = as_float_array(scanner.get("offOrigin", [0.0, 0.0, 0.0]), file, "scanner.offOrigin", shape=(3,))
    grid = tigre_grid(nvox[::-1], dvox[::-1], offo[::-1], file, "scanner.")
    check_geometry(geom, file, grid)
    notes = ["R2-Gaussian folder: TIGRE frame (rotation axis z), images row-flipped (row 0 at the top); "
             "scanner lengths taken as mm; nVoxel/offOrigin read as [x, y, z], offDetector as [u, v]"]
    reference = None
    vol_name = meta.get("vol", meta.get("ct"))
    vol_path = folder / (vol_name or "vol_gt.npy")
    if vol_path.exists():
        vol = load_npy(vol_path, "vol", "regenerate the file")
        if vol.shape != grid.shape_xyz:
            raise ScanFormatError(vol_path, "vol", f"has shape {vol.shape}, nVoxel says {list(grid.shape_xyz)} [x, y, z]",
                                  "store vol[x, y, z] of nVoxel's size")
        if not np.all(np.isfinite(vol)):
            raise ScanFormatError(vol_path, "vol", "contains NaN/inf", "repair the volume")
        reference = Volume(np.ascontiguousarray(vol.transpose(2, 1, 0), dtype=np.float32), grid)
    elif vol_name:
        notes.append(f"reference {vol_name} named in meta_data.json is absent")
    validation = None
    if meta.get("proj_test"):
        vproj, vgeom = _load_split(folder, meta, "proj_test", file, geo_kw)
        validation = ScanData(vproj, vgeom, "r2gaussian", str(file), grid=grid)
    return ScanData(proj, geom, "r2gaussian", str(folder), grid=grid, reference=reference,
                    validation=validation, notes=notes)


def write_r2gaussian(folder, proj_rowdown: np.ndarray, angles, scanner: dict, vol_xyz=None,
                     test: tuple | None = None) -> Path:
    """Write an R2-Gaussian folder (projections row 0 at the top, scanner in R2's field order)."""
    folder = Path(folder)
    (folder / "proj_train").mkdir(parents=True, exist_ok=True)
    meta = dict(scanner=scanner, vol="vol_gt.npy", bbox=[[-1, -1, -1], [1, 1, 1]], proj_train=[], proj_test=[])
    splits = [("proj_train", proj_rowdown, angles)]
    if test is not None:
        (folder / "proj_test").mkdir(exist_ok=True)
        splits.append(("proj_test", test[0], test[1]))
    for key, projs, angs in splits:
        for i, (p, a) in enumerate(zip(projs, angs)):
            rel = f"{key}/{key}_{i:04d}.npy"
            np.save(folder / rel, np.asarray(p, dtype=np.float32))
            meta[key].append(dict(file_path=rel, angle=float(a)))
    if vol_xyz is not None:
        np.save(folder / "vol_gt.npy", np.asarray(vol_xyz, dtype=np.float32))
    (folder / "meta_data.json").write_text(json.dumps(meta, indent=2))
    return folder
