"""PNG previews of a run: slices, projections (Pillow), loss curve (matplotlib, Agg backend).

They let a person check a run folder without a viewer: orthogonal mid slices of the volume (beside
the reference and their difference when there is one), a strip of input projections, and the loss
curve of an iterative method. Slices are drawn in the scanner frame, at their true aspect ratio,
each voxel a block of whole screen pixels (no interpolation), second axis pointing up, with the
world range of both axes written under each panel and a colour bar per row.

The slice and projection images are composed with Pillow directly: they are written by every run,
FDK's included, where matplotlib's import and layout alone would cost more than the reconstruction.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import Volume, evenly_spaced
from .volume_io import atomic_write

_BG = (255, 255, 255)
_FG = (20, 20, 20)
_PANEL = 240
"""Screen pixels of the longest slice side (all panels share one mm-to-pixel scale)."""
_DIVERGING = np.array([  # blue - white - red, for differences (value -> colour, evenly spaced)
    (5, 48, 97), (33, 102, 172), (67, 147, 195), (146, 197, 222), (209, 229, 240), (247, 247, 247),
    (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43), (103, 0, 31)], dtype=np.float64)


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _gray(img: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W, 3) uint8 grey levels of img between vmin and vmax."""
    t = np.clip((np.asarray(img, dtype=np.float64) - vmin) / max(vmax - vmin, 1e-30), 0.0, 1.0)
    g = np.round(t * 255.0).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _diverging(img: np.ndarray, vmax: float) -> np.ndarray:
    """(H, W, 3) uint8 colours of img on a blue-white-red scale over [-vmax, vmax]."""
    t = np.clip((np.asarray(img, dtype=np.float64) / max(vmax, 1e-30) + 1.0) / 2.0, 0.0, 1.0)
    pos = t * (len(_DIVERGING) - 1)
    i0 = np.minimum(pos.astype(int), len(_DIVERGING) - 2)
    w = (pos - i0)[..., None]
    return np.round(_DIVERGING[i0] * (1 - w) + _DIVERGING[i0 + 1] * w).astype(np.uint8)


def _mid_slices(volume: Volume):
    """(title, 2D array [rows = second axis], first axis name, second axis name, (lo, hi) of each, in mm)."""
    arr = volume.array
    nz, ny, nx = arr.shape
    m = volume.grid.index_to_world_matrix()
    identity = volume.grid.is_axis_aligned
    names = ("x", "y", "z") if identity else ("i", "j", "k")

    def span(axis: int, n: int):
        """World range (mm) covered by the voxels along a grid axis (edges, not centres)."""
        step = m[:3, axis]
        if identity:
            lo = m[axis, 3] - 0.5 * step[axis]
            return lo, lo + n * step[axis]
        length = float(np.linalg.norm(step)) * n
        return 0.0, length

    sx, sy, sz = span(0, nx), span(1, ny), span(2, nz)
    return [
        (f"{names[2]} mid ({names[0]}, {names[1]})", arr[nz // 2], names[0], names[1], sx, sy),
        (f"{names[1]} mid ({names[0]}, {names[2]})", arr[:, ny // 2, :], names[0], names[2], sx, sz),
        (f"{names[0]} mid ({names[1]}, {names[2]})", arr[:, :, nx // 2], names[1], names[2], sy, sz),
    ]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v != 0 else "0"


def _colour_bar(height: int, diverging: bool) -> np.ndarray:
    t = np.linspace(1.0, 0.0, height)[:, None] * np.ones((1, 14))
    return _diverging(2.0 * t - 1.0, 1.0) if diverging else _gray(t, 0.0, 1.0)


def _save(image, path: Path):
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", compress_level=6))


def slices_png(volume: Volume, path, reference: Volume | None = None, title: str = "", *,
               window: tuple[float, float] | None = None, difference_limit: float | None = None) -> Path:
    """Mid slices of the volume; with a reference (on the same grid): reference, volume, difference.

    `window` is the grey range (default 0 to the 99.5th percentile of the reference, else the volume)
    and `difference_limit` the difference's +- range (default half the grey range's top): a tight
    window shows soft-tissue error that the full range hides (benchmarks/error_breakdown.py --png)."""
    from PIL import Image, ImageDraw

    rows = [("reconstruction", volume)]
    if reference is not None:
        diff = Volume(volume.array - reference.array, volume.grid)
        rows = [("reference", reference), ("reconstruction", volume), ("difference", diff)]
    if window is None:
        window_src = reference.array if reference is not None else volume.array
        window = (0.0, float(np.percentile(window_src, 99.5)) or float(window_src.max()) or 1.0)
    vmin, vmax = window
    limit = vmax / 2 if difference_limit is None else difference_limit
    font, small = _font(12), _font(11)
    slices = [_mid_slices(vol) for _, vol in rows]
    extents = [max(hi - lo for lo, hi in (s[4], s[5])) for s in slices[0]]
    scale = _PANEL / max(max(extents), 1e-9)  # screen pixels per mm, shared by every panel
    sizes = [(max(1, round((s[4][1] - s[4][0]) * scale)), max(1, round((s[5][1] - s[5][0]) * scale)))
             for s in slices[0]]
    pad, title_h, label_h, bar_w = 14, 20 if title else 4, 34, 70
    col_w = [max(w, 150) for w, _ in sizes]
    row_h = max(h for _, h in sizes)
    width = pad + sum(c + pad for c in col_w) + bar_w
    height = title_h + pad + len(rows) * (18 + row_h + label_h + pad)
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        tw, _ = _text_size(draw, title, font)
        draw.text(((width - tw) // 2, 6), title, fill=_FG, font=font)
    y = title_h + pad
    for (name, _), panels in zip(rows, slices):
        is_diff = name == "difference"
        x = pad
        for (stitle, img, xa, ya, xr, yr), (w, h), cw in zip(panels, sizes, col_w):
            rgb = _diverging(img, limit) if is_diff else _gray(img, vmin, vmax)
            tile = Image.fromarray(np.ascontiguousarray(rgb[::-1])).resize((w, h), Image.NEAREST)  # second axis up
            draw.text((x, y), f"{name}: {stitle}", fill=_FG, font=font)
            top = y + 18 + (row_h - h)
            canvas.paste(tile, (x, top))
            draw.rectangle((x - 1, top - 1, x + w, top + h), outline=(150, 150, 150))
            draw.text((x, top + h + 3), f"{xa} (right): {xr[0]:.0f} .. {xr[1]:.0f} mm", fill=_FG, font=small)
            draw.text((x, top + h + 17), f"{ya} (up): {yr[0]:.0f} .. {yr[1]:.0f} mm", fill=_FG, font=small)
            x += cw + pad
        bar_h = row_h
        bar = Image.fromarray(_colour_bar(bar_h, is_diff))
        top = y + 18
        canvas.paste(bar, (x, top))
        lo, hi = (-limit, limit) if is_diff else (vmin, vmax)
        draw.text((x + 18, top - 2), _fmt(hi), fill=_FG, font=small)
        draw.text((x + 18, top + bar_h // 2 - 6), _fmt((lo + hi) / 2), fill=_FG, font=small)
        draw.text((x + 18, top + bar_h - 12), _fmt(lo), fill=_FG, font=small)
        draw.text((x, top + bar_h + 3), "1/mm", fill=_FG, font=small)
        y += 18 + row_h + label_h + pad
    _save(canvas, Path(path))
    return Path(path)


def projections_png(projections: np.ndarray, path, count: int = 5) -> Path:
    """A strip of evenly spaced input projections (line integrals), row 0 at the top."""
    from PIL import Image, ImageDraw

    n = projections.shape[0]
    views = evenly_spaced(n, count)
    vmax = float(np.percentile(projections[views], 99.5)) or 1.0
    rows, cols = projections.shape[1:]
    zoom = 200.0 / max(rows, cols)
    w, h = max(1, round(cols * zoom)), max(1, round(rows * zoom))
    font = _font(12)
    pad, head = 12, 24
    canvas = Image.new("RGB", (pad + len(views) * (w + pad), head + 18 + h + pad), _BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), f"{n} projections (line integrals, 0..{_fmt(vmax)}); {rows} rows x {cols} columns, "
              "row 0 at the top", fill=_FG, font=font)
    for i, k in enumerate(views):
        x = pad + i * (w + pad)
        tile = Image.fromarray(np.ascontiguousarray(_gray(projections[k], 0.0, vmax))).resize((w, h), Image.NEAREST)
        draw.text((x, head), f"view {k}", fill=_FG, font=font)
        canvas.paste(tile, (x, head + 18))
    _save(canvas, Path(path))
    return Path(path)


def loss_png(progress: list[dict], path) -> Path | None:
    """Loss (and projection PSNR) against iteration from progress events; None without any loss."""
    rows = [(p["iteration"], p.get("loss"), p.get("projection_psnr")) for p in progress
            if p.get("iteration") is not None and p.get("loss") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    # fixed margins that hold the twin axes' labels: tight_layout measured every text and took 0.4 s of
    # each run's end
    fig.subplots_adjust(left=0.17, right=0.86, bottom=0.14, top=0.96)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return Path(path)
