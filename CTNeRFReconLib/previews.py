"""PNG previews of a run (matplotlib, Agg backend): slices, projections, loss curve.

They let a person check a run folder without a viewer: orthogonal mid slices of the volume (beside
the reference and their difference when there is one), a strip of input projections, and the loss
curve of an iterative method. Slices are drawn in the scanner frame with their world axes labelled.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import Volume  # noqa: E402
from .volume_io import atomic_write  # noqa: E402


def _mid_slices(volume: Volume):
    """(title, 2D array, extent, x label, y label) of the three orthogonal mid slices."""
    arr = volume.array
    nz, ny, nx = arr.shape
    sx, sy, sz = volume.grid.spacing_xyz
    ex, ey, ez = nx * sx, ny * sy, nz * sz
    return [
        ("z mid (x, y)", arr[nz // 2], (0, ex, 0, ey), "x", "y"),
        ("y mid (x, z)", arr[:, ny // 2, :], (0, ex, 0, ez), "x", "z"),
        ("x mid (y, z)", arr[:, :, nx // 2], (0, ey, 0, ez), "y", "z"),
    ]


def _save(fig, path: Path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def slices_png(volume: Volume, path, reference: Volume | None = None, title: str = "") -> Path:
    """Mid slices of the volume; with a reference (on the same grid): reference, volume, difference."""
    rows = [("reconstruction", volume)]
    if reference is not None:
        diff = Volume(volume.array - reference.array, volume.grid)
        rows = [("reference", reference), ("reconstruction", volume), ("difference", diff)]
    window_src = reference.array if reference is not None else volume.array
    vmax = float(np.percentile(window_src, 99.5)) or float(window_src.max()) or 1.0
    fig, axes = plt.subplots(len(rows), 3, figsize=(10, 3.3 * len(rows)), squeeze=False)
    for r, (name, vol) in enumerate(rows):
        is_diff = name == "difference"
        for c, (stitle, img, extent, xl, yl) in enumerate(_mid_slices(vol)):
            ax = axes[r, c]
            kw = dict(cmap="RdBu_r", vmin=-vmax / 2, vmax=vmax / 2) if is_diff else dict(cmap="gray", vmin=0, vmax=vmax)
            im = ax.imshow(img, origin="lower", extent=extent, interpolation="nearest", **kw)
            ax.set_title(f"{name}: {stitle}", fontsize=9)
            ax.set_xlabel(f"{xl} (mm)", fontsize=8)
            ax.set_ylabel(f"{yl} (mm)", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=axes[r, :].tolist(), shrink=0.8, label="1/mm")
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, Path(path))
    return Path(path)


def projections_png(projections: np.ndarray, path, count: int = 5) -> Path:
    """A strip of evenly spaced input projections (line integrals)."""
    n = projections.shape[0]
    views = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    vmax = float(np.percentile(projections[views], 99.5)) or 1.0
    fig, axes = plt.subplots(1, len(views), figsize=(2.6 * len(views), 2.9), squeeze=False)
    for ax, k in zip(axes[0], views):
        ax.imshow(projections[k], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"view {k}", fontsize=9)
        ax.set_xlabel("column", fontsize=8)
        ax.set_ylabel("row", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{n} projections (line integrals); rows top to bottom", fontsize=10)
    fig.tight_layout()
    _save(fig, Path(path))
    return Path(path)


def loss_png(progress: list[dict], path) -> Path | None:
    """Loss (and projection PSNR) against iteration from progress events; None without any loss."""
    rows = [(p["iteration"], p.get("loss"), p.get("projection_psnr")) for p in progress
            if p.get("iteration") is not None and p.get("loss") is not None]
    if not rows:
        return None
    it, loss, psnr = (np.asarray([np.nan if r[i] is None else r[i] for r in rows], dtype=float)
                      for i in range(3))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(it, loss, color="tab:blue", label="loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss", color="tab:blue")
    if np.isfinite(psnr).any():
        ax2 = ax.twinx()
        ax2.plot(it, psnr, color="tab:orange", label="projection PSNR")
        ax2.set_ylabel("projection PSNR (dB)", color="tab:orange")
    fig.tight_layout()
    _save(fig, Path(path))
    return Path(path)
