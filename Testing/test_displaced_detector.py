"""A detector displaced sideways on a full orbit (an offset-detector or half-fan scan): the default grid
is the circle its far edge reaches (fov.measured_geometry), FDK weights the columns measured twice
(fdk._displaced_detector), nerf reconstructs the whole circle, and the near edge, which sees object in
every view, is not taken for an object wider than the field of view (lateral_extension.plan_lateral).

Exact line integrals of ellipsoid phantoms; the small orbit of test_fdk.py (source 400 mm from the axis,
600 mm from the detector, 112 columns of 2.4 mm: 134.4 mm either side of the principal point) with the
detector moved 70 mm sideways: its near edge is 64.4 mm past the principal point (about 43 mm at the
axis), its far edge 204.4 mm (about 130 mm).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from CTNeRFReconLib.data import ScanData
from CTNeRFReconLib.fdk import FDKConfig, fdk
from CTNeRFReconLib.fov import common_fov_bounds, default_grid, measured_geometry
from CTNeRFReconLib.geometry import VolumeGrid, circular_geometry
from CTNeRFReconLib.methods import RunContext, get_method
from CTNeRFReconLib.orbit import displaced_detector
from CTNeRFReconLib.phantom import Ellipsoid, phantom_line_integrals, voxelize
from CTNeRFReconLib.rays import all_pixel_indices, view_rays

SID, SDD, ROWS, COLS, PITCH, SHIFT = 400.0, 600.0, 40, 112, 2.4, 70.0
HALF = COLS * PITCH / 2
BODY = [Ellipsoid((0.0, 0.0, 0.0), (95.0, 20.0, 80.0), 0.02),
        Ellipsoid((70.0, 0.0, 10.0), (12.0, 12.0, 12.0), 0.03),   # in the ring only half the views see
        Ellipsoid((-10.0, 0.0, -20.0), (15.0, 12.0, 15.0), 0.01)]  # inside the circle every view sees


def _geometry(degrees, shift=SHIFT):
    return circular_geometry(SID, SDD, np.radians(degrees), (ROWS, COLS), (PITCH, PITCH), det_offset=(0.0, shift),
                             axis="y")


def _scan(geometry, ellipsoids=BODY):
    lo, hi = np.full(3, -300.0), np.full(3, 300.0)
    v, r, c = all_pixel_indices(geometry)
    rays = view_rays(geometry, v, r, c, lo, hi)
    p = phantom_line_integrals(ellipsoids, rays.origins.double().numpy(), rays.directions.double().numpy())
    return ScanData(p.reshape(geometry.n_views, *geometry.det_shape).astype(np.float32), geometry, "test", "<phantom>")


def _radius_at_axis(mm_at_detector):
    """Distance from the axis of the ray through a point this far from the principal point."""
    return SID * math.sin(math.atan(mm_at_detector / SDD))


def test_the_default_grid_is_the_circle_the_far_edge_reaches():
    full = _geometry(np.arange(90) * 4.0)
    displaced = displaced_detector(full)
    np.testing.assert_allclose(displaced.offsets, SHIFT)
    np.testing.assert_allclose(displaced.overlap, HALF - SHIFT)
    np.testing.assert_allclose(displaced.far, HALF + SHIFT)
    grid = default_grid(full)
    lo, hi = grid.bounds()
    far, near = _radius_at_axis(HALF + SHIFT), _radius_at_axis(HALF - SHIFT)
    h = grid.spacing_xyz[0]
    for axis in (0, 2):
        assert hi[axis] == pytest.approx(far, abs=h) and lo[axis] == pytest.approx(-far, abs=h)
    # every view sees only the near circle; the axis's extent is the every-view region's
    every_lo, every_hi = common_fov_bounds(full)
    assert every_hi[0] == pytest.approx(near, rel=0.01)
    assert hi[1] == pytest.approx(every_hi[1], abs=h)
    # the measured geometry only stands for the bounds: centred on the principal point, as wide as the far side
    virtual = measured_geometry(full)
    assert displaced_detector(virtual) is None and virtual.pixel_pitch[1] == pytest.approx(2 * (HALF + SHIFT) / COLS)
    # an arc that does not go round leaves lines unmeasured there: the every-view box, as before, and
    # FDK says what it cannot do
    short = _geometry(np.arange(50) * 4.0)
    assert displaced_detector(short) is None
    np.testing.assert_allclose(default_grid(short).bounds()[1], common_fov_bounds(short)[1], atol=h)
    notes = []
    fdk((np.zeros((short.n_views, ROWS, COLS), np.float32), short), VolumeGrid.centered((4, 4, 4), (8.0,) * 3),
        notes=notes)
    assert any("displaced 70 mm off its principal point on a short scan" in n for n in notes), notes
    # an offset under a column pitch (a calibration offset) is a centred detector
    assert displaced_detector(_geometry(np.arange(90) * 4.0, shift=0.5 * PITCH)) is None
    # the other side works the same way
    assert np.all(displaced_detector(_geometry(np.arange(90) * 4.0, shift=-SHIFT)).offsets < 0)


def test_info_and_the_panel_say_what_was_understood():
    """`info --json` (what the panel reads) and its summary line name the displacement and the grid."""
    from CTNeRFReconLib.cli import info_dict
    from CTNeRFReconLib.slicer_bridge.projections import describe_summary

    scan = _scan(_geometry(np.arange(40) * 9.0))
    said = info_dict(scan, support=False)
    assert said["displaced_detector"] == {"offset_mm": SHIFT, "overlap_mm": HALF - SHIFT}
    assert said["default_grid"] == default_grid(scan.geometry).to_dict()
    assert "detector displaced 70 mm on a full orbit" in describe_summary(said)
    assert "source-detector 600 mm" in describe_summary(said)  # to the detector's plane, not its far-off centre
    centred = _scan(_geometry(np.arange(40) * 9.0, shift=0.0))
    assert "displaced_detector" not in info_dict(centred, support=False)


GRID = VolumeGrid.centered((66, 14, 60), (3.0, 3.0, 3.0))


def test_fdk_weights_the_columns_measured_twice():
    """With the weights the circle both sides see and the ring only half the views see come out at the
    body's value; without them the circle is far too bright. Against a centred detector as wide as the
    far side (every line measured twice), the weighted reconstruction is as close to the truth."""
    scan = _scan(_geometry(np.arange(180) * 2.0))
    truth = voxelize(BODY, GRID)
    notes = []
    weighted = fdk(scan, GRID, FDKConfig(filter="hann"), notes=notes).array
    assert any(n.startswith("displaced detector (70 mm off its principal point)") for n in notes), notes
    bare = fdk(scan, GRID, FDKConfig(filter="hann", displaced_weights=False)).array
    wide = circular_geometry(SID, SDD, np.radians(np.arange(180) * 2.0), (ROWS, 2 * COLS), (PITCH, PITCH), axis="y")
    centred = fdk(_scan(wide), GRID, FDKConfig(filter="hann")).array
    x = GRID.origin_xyz[0] + 3.0 * np.arange(66)
    z = GRID.origin_xyz[2] + 3.0 * np.arange(60)
    r = np.hypot(z[:, None, None], x[None, None, :]) * np.ones(GRID.shape_zyx)  # (z, y, x)
    inner = (r < 30) & (np.abs(truth - 0.02) < 1e-6)
    ring = (r > 60) & (r < 85) & (np.abs(truth - 0.02) < 1e-6)
    middle = (slice(None), slice(5, 9))  # the middle slices along y, the axis: away from the cone's ends
    assert weighted[middle][inner[middle]].mean() == pytest.approx(0.02, rel=0.01)
    assert weighted[middle][ring[middle]].mean() == pytest.approx(0.02, rel=0.01)
    # measured: 0.0261 in the circle and 0.0235 in the ring unweighted (the near edge's truncation
    # spreads the double count); 0.0238 in the ring with the weights on the projections as Wang has them
    assert bare[middle][inner[middle]].mean() > 1.25 * 0.02
    body = (truth > 0)[middle]
    rms = {name: float(np.sqrt(np.mean((vol[middle] - truth[middle])[body] ** 2)))
           for name, vol in (("weighted", weighted), ("bare", bare), ("centred", centred))}
    assert rms["weighted"] < 1.25 * rms["centred"] and rms["bare"] > 3 * rms["weighted"], rms


def test_nerf_reconstructs_the_whole_circle():
    """nerf needs no weights (each ray is a ray): the insert only half the views see comes out as well
    as the body inside the circle every view sees, and the near edge does not widen the grid."""
    scan = _scan(_geometry(np.arange(40) * 9.0))
    out = default_grid(scan.geometry)
    truth = voxelize(BODY, out, supersample=2)
    ctx = RunContext(device="cpu", seed=0, settings=dict(preset="preview", iterations=300, snapshot_every=0,
                                                         eval_every=1000))
    vol = get_method("nerf").reconstruct(scan, out, ctx).array
    support = ctx.report["support"]
    # the near edge sees object in every view, but cuts nothing the orbit does not measure: the grid is
    # not widened past it, and the edge-scaled TV is on with no truncation to keep it in spite of
    tv = ctx.report["tv_prior"]
    assert "widened" not in support and tv["plain_because"] is None and tv["edge_despite"] is None, tv
    insert, inner = (voxelize([e], out) > 0.5 * abs(e.value) for e in BODY[1:])
    assert vol[insert].mean() == pytest.approx(0.05, rel=0.1)  # the body's 0.02 plus the insert's 0.03
    assert vol[inner].mean() == pytest.approx(0.03, rel=0.1)  # the body's 0.02 plus the insert's 0.01
    x = out.origin_xyz[0] + out.spacing_xyz[0] * np.arange(out.shape_xyz[0])
    z = out.origin_xyz[2] + out.spacing_xyz[2] * np.arange(out.shape_xyz[2])
    r = np.hypot(z[:, None, None], x[None, None, :]) * np.ones(out.shape_zyx)
    near = _radius_at_axis(HALF - SHIFT)
    err = (vol - truth) ** 2
    centre_rms, ring_rms = (float(np.sqrt(err[sel].mean())) for sel in (r < near, (r > near) & (r < 90)))
    # measured: 0.86e-3 /mm RMS in the ring against 0.91e-3 inside the circle every view sees
    assert ring_rms < 1.25 * centre_rms, (centre_rms, ring_rms)
