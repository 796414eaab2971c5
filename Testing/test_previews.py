"""PNG previews: written atomically, second axis up, true aspect, projections row 0 at the top."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from CTNeRFReconLib.data import Volume
from CTNeRFReconLib.geometry import VolumeGrid
from CTNeRFReconLib.previews import loss_png, projections_png, slices_png


def _bright_rows(png, box):
    """Row indices (within the crop box) of the brightest pixels of the first panel, as read back."""
    img = np.asarray(Image.open(png).convert("L"), dtype=float)[box[1]:box[3], box[0]:box[2]]
    return np.argwhere(img == img.max())[:, 0]


def test_slices_are_drawn_in_the_scanner_frame(tmp_path):
    # a wide, flat grid (x 60 mm, y 20 mm, z 30 mm) with a bright spot at high y, low x
    grid = VolumeGrid((30, 10, 15), (2.0, 2.0, 2.0), (-29.0, -9.0, -14.0))
    arr = np.zeros(grid.shape_zyx, np.float32)
    arr[:, 8:, 2:5] = 1.0  # y index 8-9 (top), x index 2-4 (left)
    path = slices_png(Volume(arr, grid), tmp_path / "p.png", title="t")
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert img.shape[1] > img.shape[0] / 3  # a real picture
    # the first panel (z mid: x across, y up) sits below its title at the left: find its bright block
    ys, xs = np.nonzero(img[:, : img.shape[1] // 3] == 255)
    assert ys.size > 0
    panel_rows = np.nonzero((img[:, : img.shape[1] // 3] < 250).sum(axis=1) > 50)[0]
    # the bright block is in the top part and the left part of the panel: y up, x to the right
    top, bottom = panel_rows.min(), panel_rows.max()
    assert ys.mean() < top + 0.4 * (bottom - top)
    assert xs.mean() < img.shape[1] // 6
    # with a reference: three rows of panels, the file replaced atomically (no temporary left behind)
    slices_png(Volume(arr, grid), tmp_path / "p.png", reference=Volume(arr * 0.5, grid), title="with reference")
    taller = Image.open(tmp_path / "p.png")
    assert taller.size[1] > 2 * img.shape[0] * 0.8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "p.png").stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file, not 0600


def test_projection_strip_and_loss_curve(tmp_path):
    proj = np.zeros((7, 20, 30), np.float32)
    proj[:, :3, :] = 2.0  # rows 0-2 bright: they must be drawn at the top of each tile
    path = projections_png(proj, tmp_path / "proj.png", count=5)
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    bright = np.nonzero((img == 255).sum(axis=1) > 20)[0]
    dark = np.nonzero((img == 0).sum(axis=1) > 20)[0]
    assert bright.size and dark.size and bright.mean() < dark.mean()
    assert loss_png([{"iteration": 1, "loss": None}], tmp_path / "loss.png") is None
    progress = [{"iteration": i, "loss": 1.0 / i, "projection_psnr": 20.0 + i} for i in range(1, 20)]
    assert loss_png(progress, tmp_path / "loss.png").stat().st_size > 1000
