"""benchmarks/error_breakdown.py tells blur from noise: the two ways a reconstruction goes wrong."""
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from error_breakdown import breakdown  # noqa: E402


def _truth(n=40):
    """Soft tissue (water-like) with a textured interior, a bright bone block and air around."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:n, :n, :n]
    body = ((x - n / 2) ** 2 + (y - n / 2) ** 2 + (z - n / 2) ** 2) < (0.4 * n) ** 2
    texture = ndi.gaussian_filter(rng.standard_normal((n, n, n)), 1.0)
    truth = np.where(body, 0.019 + 0.0005 * texture / texture.std(), 0.0)
    truth[16:24, 16:24, 10:14] = 0.05
    return truth


def test_blur_shows_at_the_edges_and_noise_in_the_flat_parts():
    truth = _truth()
    blurred = breakdown(truth, ndi.gaussian_filter(truth, 1.2), margin=2)
    noisy = breakdown(truth, truth + 0.002 * np.random.default_rng(1).standard_normal(truth.shape), margin=2)
    # blur: the error sits at the edges, and smoothing it further only makes it worse
    assert blurred["edge_error_share"] > 0.6 and blurred["flat_error_share"] < 0.1
    assert all(p < blurred["psnr"] for p in blurred["smoothed_psnr"].values())
    bone = next(b for b in blurred["bands"] if b["band"] == "bone")
    assert bone["bias"] < 0  # a blurred bright block loses its contrast
    # white noise: spread over every voxel alike, and smoothing helps
    assert noisy["edge_error_share"] < 0.2 and noisy["flat_error_share"] > 0.4
    assert noisy["smoothed_psnr"]["0.4"] > noisy["psnr"] + 1
    assert abs(sum(b["error_share"] for b in noisy["bands"]) - 1.0) < 0.01
    # the truth's texture is in the flat soft tissue; noise is not correlated with it
    assert noisy["soft_flat"]["truth_texture_rms"] > 1e-4
    assert abs(noisy["soft_flat"]["texture_correlation"]) < 0.5


def test_the_slices_picture_is_written(tmp_path):
    from error_breakdown import slices_png
    from PIL import Image

    from CTNeRFReconLib.data import Volume
    from CTNeRFReconLib.geometry import VolumeGrid

    truth = _truth()
    grid = VolumeGrid.centered(truth.shape[::-1], (3.0, 3.0, 3.0))
    path = slices_png(Volume(truth, grid), Volume(ndi.gaussian_filter(truth, 1.2), grid), tmp_path / "slices.png")
    with Image.open(path) as image:
        assert image.size[0] > 600 and image.size[1] > 400
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 20, "a blank picture"
