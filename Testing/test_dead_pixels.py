"""A flat panel's dead pixels and lines: missing measurements, not a reason to refuse a scan.

A few pixels without a value (NaN or infinity in line integrals, a pixel dead in the flat field) are
marked as defects, filled from the nearest measured pixel of their view for FDK and the previews, and
left out of nerf's fit; more than `MAX_DEFECT_FRACTION` of a view is still refused (test_bad_input.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from CTNeRFReconLib.cli import info_dict
from CTNeRFReconLib.data import ScanData
from CTNeRFReconLib.formats import ScanFormatError, load_scan
from CTNeRFReconLib.formats.validate import MAX_DEFECT_FRACTION
from CTNeRFReconLib.methods import RunContext, get_method
from CTNeRFReconLib.metrics import psnr3d
from CTNeRFReconLib.nerf.config import NerfConfig
from CTNeRFReconLib.nerf.train import NerfTrainer
from CTNeRFReconLib.slicer_bridge.projections import describe_summary
from nerf_case import small_phantom_case


def _stack(tmp_path, proj, **extra):
    np.save(tmp_path / "p.npy", proj)
    desc = {"projections": "p.npy", **extra,
            "geometry": {"type": "circular", "sid": 500, "sdd": 800, "angles_deg": [0, 90, 180, 270],
                         "pixel_pitch": [2.0, 2.0]}}
    (tmp_path / "scan.json").write_text(json.dumps(desc))
    return tmp_path / "scan.json"


def _lines(rows=16, cols=16):
    return np.random.default_rng(0).uniform(0.1, 2.0, (4, rows, cols)).astype(np.float32)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_few_pixels_without_a_value_are_marked_and_read_from_their_neighbour(tmp_path, value):
    lines = _lines()
    proj = lines.copy()
    proj[2, 5, 7] = value
    proj[0, 0, 3] = value
    scan = load_scan(_stack(tmp_path, proj))
    assert scan.defects is not None and scan.defects.sum() == 2
    assert scan.defects[2, 5, 7] and scan.defects[0, 0, 3]
    assert np.isfinite(scan.projections).all()
    # the nearest measured pixel of the same view (one of the four at distance 1)
    assert scan.projections[2, 5, 7] in {lines[2, 4, 7], lines[2, 6, 7], lines[2, 5, 6], lines[2, 5, 8]}
    assert scan.projections[0, 0, 3] in {lines[0, 1, 3], lines[0, 0, 2], lines[0, 0, 4]}
    unchanged = ~scan.defects
    assert np.array_equal(scan.projections[unchanged], lines[unchanged])
    assert any("2 detector pixels in 2 of 4 views hold no value" in n for n in scan.notes)
    said = info_dict(scan, support=False)  # what `info --json` prints and the panel reads
    assert said["defect_pixels"] == 2
    assert "2 pixels without a value (dead pixels: left out of the fit)" in describe_summary(said)


def test_a_view_with_more_missing_than_dead_lines_explain_is_refused(tmp_path):
    proj = _lines()
    too_many = int(np.ceil(MAX_DEFECT_FRACTION * proj[0].size)) + 1
    proj[1].reshape(-1)[:too_many] = np.nan
    with pytest.raises(ScanFormatError) as info:
        load_scan(_stack(tmp_path, proj))
    assert info.value.field == "projections" and "view 1" in str(info.value)
    assert "p.npy" in str(info.value)


def test_a_pixel_dead_in_the_flat_field_is_a_defect_in_every_view(tmp_path):
    lines = _lines()
    raw = (2e4 * np.exp(-lines) + 100).astype(np.float32)
    flat = np.full((16, 16), 2e4 + 100.0)
    flat[3, 9] = 100.0  # no brighter than the dark level: the pixel never counted
    raw[1, 12, 2] = np.inf
    np.save(tmp_path / "flat.npy", flat)
    scan = load_scan(_stack(tmp_path, raw, kind="intensity", flat="flat.npy", dark=100.0))
    assert scan.defects[:, 3, 9].all() and scan.defects[1, 12, 2] and scan.defects.sum() == 5
    good = ~scan.defects
    assert np.allclose(scan.projections[good], lines[good], atol=1e-4)
    flat[:, :2] = 0.0  # two dead columns of 16 and the pixel: 33 of 256, 12.9 % of the panel
    np.save(tmp_path / "flat.npy", flat)
    with pytest.raises(ScanFormatError) as info:
        load_scan(_stack(tmp_path, raw, kind="intensity", flat="flat.npy", dark=100.0))
    assert info.value.field == "flat" and "12.9%" in str(info.value)


def _with_dead_column(scan: ScanData, fill: float) -> ScanData:
    proj = scan.projections.copy()
    proj[:, :, 20] = fill  # one detector column, through the phantom, in every view
    return ScanData(proj, scan.geometry, "synthetic", "<dead column>")


# the small phantom's quick schedule (test_nerf.py's FAST, with the prior and TV its 3 dB margin was set with)
QUICK = dict(preset="preview", iterations=200, rays_start=4096, rays_end=8192, snapshot_every=0, eval_every=50,
             fdk_init_iterations=0, checkpoint_every=0, refine_fraction=0.5, tv_edge=0.0)


def _nerf(scan, grid):
    return get_method("nerf").reconstruct(scan, grid, RunContext(device="cpu", seed=0, settings=dict(QUICK)))


def test_nerf_leaves_a_dead_column_out_and_does_as_well_as_with_it_measured():
    scan, ref = small_phantom_case(noise_i0=2e4)
    dead = _with_dead_column(scan, np.nan)
    assert dead.defects[:, :, 20].all() and dead.defects.sum() == scan.n_views * scan.geometry.det_shape[0]
    trainers = [NerfTrainer(s, ref.grid, NerfConfig(iterations=10), RunContext()) for s in (scan, dead)]
    every_view = np.arange(scan.n_views)
    (_, meas_intact, hit_intact), (_, meas_dead, hit_dead) = (t._rays_for(s, every_view)
                                                               for t, s in zip(trainers, (scan, dead)))
    assert np.array_equal(hit_dead, hit_intact & ~dead.defects) and hit_intact[:, :, 20].sum() > 0
    assert len(meas_dead) == len(meas_intact) - int(hit_intact[:, :, 20].sum())
    p_intact = psnr3d(ref.array, _nerf(scan, ref.grid).array)
    p_dead = psnr3d(ref.array, _nerf(dead, ref.grid).array)
    # what a reader that turned the missing values into zeros (air) would fit: a ring through the phantom
    p_zero = psnr3d(ref.array, _nerf(_with_dead_column(scan, 0.0), ref.grid).array)
    assert p_dead > p_intact - 0.3, (p_dead, p_intact)
    assert p_dead > p_zero + 1.0, (p_dead, p_zero)
    # FDK reads the column from its neighbour: close to the intact scan's, far from the zeros'
    fdk = get_method("fdk")
    f_intact, f_dead, f_zero = (psnr3d(ref.array, fdk.reconstruct(s, ref.grid, RunContext()).array)
                                for s in (scan, dead, _with_dead_column(scan, 0.0)))
    assert f_dead > f_intact - 0.3 and f_dead > f_zero + 1.0, (f_intact, f_dead, f_zero)
