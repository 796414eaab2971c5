"""The default grid: the region every view sees, at the detector pitch seen at the isocentre."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from CTNeRFReconLib.fov import common_fov_bounds, default_grid, isocentre, pitch_at_isocentre
from CTNeRFReconLib.geometry import circular_geometry

SID, SDD, DET, PITCH = 1000.0, 1500.0, 128, 2.4
HALF = DET / 2 * PITCH


def orbit(views=360, **kw):
    return circular_geometry(SID, SDD, np.radians(np.arange(views) * 360.0 / views), (DET, DET), (PITCH, PITCH), **kw)


def test_circular_orbit_sees_a_cylinder():
    lo, hi = common_fov_bounds(orbit(axis="y"))
    radius = SID * np.sin(np.arctan(HALF / SDD))  # the circle tangent to every view's fan
    half_height = HALF * SID / SDD  # a point on the axis at the detector edge
    assert lo == pytest.approx([-radius, -half_height, -radius], rel=1e-3)
    assert hi == pytest.approx([radius, half_height, radius], rel=1e-3)


def test_default_grid_voxel_is_the_pitch_at_the_isocentre():
    geo = orbit(views=40, axis="y")
    assert isocentre(geo) == pytest.approx([0, 0, 0], abs=1e-9)
    assert pitch_at_isocentre(geo) == pytest.approx(PITCH * SID / SDD)
    grid = default_grid(geo)
    assert grid.spacing_xyz == pytest.approx((1.6, 1.6, 1.6))
    assert grid.shape_xyz == (128, 128, 128)
    lo, hi = grid.bounds()
    assert (lo + hi) / 2 == pytest.approx([0, 0, 0], abs=1e-6)


def test_detector_offset_moves_the_region_along_the_axis():
    # TIGRE frame: rotation axis z, detector rows along -z; a +v offset moves the view down
    lo, hi = common_fov_bounds(orbit(axis="z", det_offset=(30.0, 0.0)))
    centre = (lo + hi) / 2
    assert centre[2] == pytest.approx(-30.0 * SID / SDD, abs=0.5)
    assert centre[:2] == pytest.approx([0, 0], abs=1e-6)


def test_parallel_beam_and_short_scan():
    lo, hi = common_fov_bounds(orbit(views=90, axis="y", parallel=True))
    assert hi == pytest.approx([HALF, HALF, HALF], rel=1e-3)
    assert pitch_at_isocentre(orbit(views=4, axis="y", parallel=True)) == PITCH


def test_grid_is_capped():
    grid = default_grid(orbit(views=40, axis="y"), max_voxels=32 ** 3)
    assert grid.n_voxels <= 32 ** 3
    assert grid.spacing_xyz[0] > 1.6


def test_disjoint_views_are_refused():
    geo = circular_geometry(SID, SDD, [0.0, np.pi / 2], (4, 4), (0.1, 0.1), axis="y")
    assert np.all(common_fov_bounds(geo)[1] > common_fov_bounds(geo)[0])
    # tilt the two narrow cones apart along the rotation axis: one looks up, the other down
    centers = geo.det_centers + np.array([[0.0, 300.0, 0.0], [0.0, -300.0, 0.0]])
    with pytest.raises(ValueError, match="every view"):
        common_fov_bounds(dataclasses.replace(geo, det_centers=centers))


def test_output_grid_must_hold_no_source_and_be_seen():
    """formats.validate.grid_problem: what `reconstruct` refuses as an output grid."""
    from CTNeRFReconLib.formats.validate import grid_problem
    from CTNeRFReconLib.geometry import VolumeGrid

    g = orbit(views=8, axis="y")
    assert grid_problem(g, VolumeGrid.centered((64, 64, 64), (3.0, 3.0, 3.0))) is None
    # a box reaching past the orbit holds the sources
    assert "inside the output grid" in grid_problem(g, VolumeGrid.centered((30, 30, 30), (80.0, 80.0, 80.0)))
    # a box in another frame (e.g. patient coordinates, far along the rotation axis): no view sees it
    assert "no view sees" in grid_problem(g, VolumeGrid.centered((20, 20, 20), (3.0, 3.0, 3.0), (0.0, 2000.0, 0.0)))
    # off-centre but inside the cone of some views only: accepted (the default grid is stricter)
    assert grid_problem(g, VolumeGrid.centered((10, 10, 10), (3.0, 3.0, 3.0), (0.0, 0.0, 700.0))) is None
    # behind every source (outside the orbit on the axis plane): only views that face it count
    far = VolumeGrid.centered((10, 10, 10), (3.0, 3.0, 3.0), (0.0, 900.0, 3000.0))
    assert grid_problem(g, far) is not None
    # parallel beam: sources are only directions, never "inside"; a box beside the detector is unseen
    p = orbit(views=8, axis="y", parallel=True)
    assert grid_problem(p, VolumeGrid.centered((30, 30, 30), (80.0, 80.0, 80.0))) is None
    assert "no view sees" in grid_problem(p, VolumeGrid.centered((5, 5, 5), (3.0, 3.0, 3.0), (0.0, 500.0, 0.0)))
