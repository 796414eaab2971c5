"""The training grid goes on past the field of view's sides where the object is wider than it
(lateral_extension.py): how far, where it applies, what the trainer does with it, and that it removes
the truncation's error inside the output box.

Exact line integrals on the support tests' small RTK-frame orbit (rotation axis y, a field of view of
about 91 mm radius): a body 220 x 210 mm across cuts the detector's column edges in every view, and
is short enough along y that the row edges see air.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from CTNeRFReconLib.data import ScanData
from CTNeRFReconLib.fov import default_grid
from CTNeRFReconLib.geometry import VolumeGrid, circular_geometry
from CTNeRFReconLib.lateral_extension import (MAX_FRACTION, THIN_FRACTION, describe_faces, edge_rays,
                                              inner_voxel_count, plan_for_scan, plan_lateral, reach_past_faces,
                                              thin_reach_past_faces)
from CTNeRFReconLib.methods import RunContext, get_method
from CTNeRFReconLib.nerf.config import NerfConfig
from CTNeRFReconLib.nerf.memory import estimate
from CTNeRFReconLib.nerf.train import NerfTrainer, carve_support, reuse_support
from CTNeRFReconLib.phantom import Ellipsoid, voxelize
from CTNeRFReconLib.support import Support, air_statistics, detector_edges_cut
from test_support import DET, PHANTOM, PITCH, SDD, SID, _geometry, _project

WIDE = [Ellipsoid((0.0, 0.0, 0.0), (110.0, 36.0, 105.0), 0.02),
        Ellipsoid((70.0, 0.0, 20.0), (25.0, 30.0, 25.0), 0.012),
        Ellipsoid((-20.0, 5.0, -10.0), (15.0, 20.0, 15.0), -0.01)]
"""A body wider than the field of view, an insert that lies mostly outside it and one inside."""


def _scan(ellipsoids):
    geo = _geometry()
    return ScanData(_project(geo, ellipsoids), geo, "synthetic", "<phantom>")


def test_the_sides_go_on_as_far_as_the_edge_rays_say_the_object_goes():
    geo = _geometry()
    grid = default_grid(geo)
    lo, hi = grid.bounds()
    half = max(hi[0] - lo[0], hi[2] - lo[2]) / 2
    axes, centre = (0, 2), (np.asarray(lo) + np.asarray(hi)) / 2
    h = grid.spacing_xyz[0]
    # a disc of radius 110 mm centred on the axis (short along it, so the rows see air): the edge rays'
    # line integrals against their rows' thickest give its radius back, the same past every face
    disc = [Ellipsoid((0.0, 0.0, 0.0), (110.0, 36.0, 110.0), 0.02)]
    proj = _project(geo, disc)
    threshold = air_statistics(proj)["threshold"]
    cut = detector_edges_cut(proj, threshold)
    assert cut == ["columns-", "columns+"]
    rays = edge_rays(proj, geo, threshold, axes, centre)
    seen = rays.radius > rays.r
    assert seen.all() and np.median(rays.radius) == pytest.approx(110.0, rel=0.04)
    assert rays.r == pytest.approx(half, rel=0.03)
    np.testing.assert_allclose(reach_past_faces(rays, axes, lo, hi, centre), 110.0 - half, atol=0.04 * 110)
    wide = plan_lateral(geo, cut, grid, proj, threshold)
    assert wide.axes == (0, 2) and wide.edges == ("columns-", "columns+")
    assert set(wide.faces()) == {"x-", "x+", "z-", "z+"}
    assert all(n == math.ceil(mm / h) for mm, n in wide.faces().values())
    # a disc of radius 100 mm 20 mm off the axis along x+: past x+ by about its 28 mm (it reads 5 % high:
    # the edge rays facing x+ pass it off its centre), past z- and z+ by 8, and not past x-
    off = plan_lateral(geo, cut, grid, _project(geo, [Ellipsoid((20.0, 0.0, 0.0), (100.0, 36.0, 100.0), 0.02)]),
                       threshold)
    faces = off.faces()
    assert set(faces) == {"x+", "z-", "z+"} and off.voxels[0][0] == 0
    assert 120.0 - half <= faces["x+"][0] <= 120.0 * 1.06 - half, faces
    assert faces["z-"][0] == pytest.approx(100.0 - half, abs=h) and faces["z+"][0] == pytest.approx(100.0 - half, abs=h)
    grown = off.grown(grid)
    np.testing.assert_allclose(np.asarray(grown.bounds()[0]) - lo, [0, 0, -faces["z-"][1] * h])
    np.testing.assert_allclose(np.asarray(grown.bounds()[1]) - hi, [faces["x+"][1] * h, 0, faces["z+"][1] * h])
    said = off.summary()["faces"]  # what run.json holds; the two z faces agree (a symmetric case)
    assert describe_faces(off.summary()) == f"{said['x+']['mm']:g} mm past x+, {said['z-']['mm']:g} mm past z- and z+"
    # a body whose sides only just leave the field of view is not widened, one far wider by the most
    just = _project(geo, [Ellipsoid((0.0, 0.0, 0.0), (93.0, 36.0, 93.0), 0.02)])
    assert detector_edges_cut(just, threshold) == ["columns-", "columns+"]
    assert plan_lateral(geo, cut, grid, just, threshold) is None
    far = _project(geo, [Ellipsoid((0.0, 0.0, 0.0), (400.0, 36.0, 400.0), 0.02)])
    np.testing.assert_allclose(plan_lateral(geo, cut, grid, far, threshold).mm, MAX_FRACTION * half)
    # a fixed fraction when asked, past every face
    fixed = plan_lateral(geo, cut, grid, proj, threshold, fraction=0.25)
    np.testing.assert_allclose(fixed.mm, 0.25 * half)
    n = math.ceil(0.25 * half / h)
    assert fixed.voxels == ((n, n), (n, n))
    grown = fixed.grown(grid)
    glo, ghi = grown.bounds()
    assert grown.shape_xyz == (grid.shape_xyz[0] + 2 * n, grid.shape_xyz[1], grid.shape_xyz[2] + 2 * n)
    np.testing.assert_allclose(glo - lo, [-n * h, 0, -n * h])
    np.testing.assert_allclose(ghi - hi, [n * h, 0, n * h])
    # the grown grid's voxels inside the first box are the first box's
    assert inner_voxel_count(grown, lo, hi) == grid.n_voxels == inner_voxel_count(grid, lo, hi)
    # one column edge is enough; none cut, or rows along no grid axis: nothing
    assert plan_lateral(geo, ["columns+"], grid, proj, threshold).edges == ("columns+",)
    assert plan_lateral(geo, ["rows-", "rows+"], grid, proj, threshold) is None
    roll = math.radians(20.0)
    rolled_v = geo.det_v * math.cos(roll) + geo.det_u * math.sin(roll)
    rolled = type(geo)(geo.sources, geo.det_centers, geo.det_u, rolled_v, geo.det_shape, geo.pixel_pitch)
    assert plan_lateral(rolled, cut, grid, proj, threshold) is None
    # a TIGRE-frame orbit (rotation axis z) widens x and y
    tigre = circular_geometry(SID, SDD, np.radians(np.arange(8) * 45.0), (DET, DET), (PITCH, PITCH), axis="z")
    assert plan_lateral(tigre, cut, default_grid(tigre), None, threshold, fraction=0.25).axes == (0, 1)


def test_the_trainer_widens_the_grid_carves_it_and_counts_the_widened_grid_for_the_tv_weight():
    """The support is carved on the widened grid (the object's part outside the field of view is kept,
    the air some view sees there is carved), run.json and the memory check follow it, a checkpoint's
    support is taken back as it is, and the TV weight counts the widened grid's voxels."""
    scan = _scan(WIDE)
    out = default_grid(scan.geometry)
    said = []
    ctx = RunContext(device="cpu", seed=0, settings=dict(preset="preview"), on_message=said.append)
    cfg = NerfConfig.from_settings(ctx.settings)
    trainer = NerfTrainer(scan, out, cfg, ctx)
    wide = ctx.report["support"]["widened"]
    assert wide["axes"] == "xz" and set(wide["faces"]) == {"x-", "x+", "z-", "z+"}
    assert "extended" not in ctx.report["support"] and wide["thin"] == []
    assert any(m.startswith(f"the object is wider than the field of view (the detector's columns-, columns+ "
                            f"edge(s) see it): training {describe_faces(wide)} (the output grid") for m in said), said
    # the support reaches the widened grid's sides: the warning says they are trained, not that a rim is coming
    assert {"x-", "x+", "z-", "z+"} <= set(trainer.support.faces_reached)
    warnings = [m for m in said if m.startswith("warning: the object reaches the box's x-, x+, z-, z+")]
    assert len(warnings) == 1 and "trained but not output" in warnings[0] and "rim" not in warnings[0], said
    (olo, ohi), (tlo, thi) = out.bounds(), trainer.grid.bounds()
    assert tlo[0] < olo[0] - 1 and thi[2] > ohi[2] + 1  # the training box goes past the field of view
    assert tlo[1] >= olo[1] - 1e-6 and thi[1] <= ohi[1] + 1e-6  # not along the axis: the rows see air
    # the insert outside the field of view is in the support; air some view sees past the body is not
    h = trainer.grid.spacing_xyz[0]
    inside = trainer.support.mask_on(VolumeGrid((1, 1, 1), (h, h, h), (92.0, 0.0, 30.0)))
    assert inside.all()
    assert trainer.support.fraction < 1.0
    # the edge-scaled TV is kept on the truncated scan (tv_edge_when_truncated), and its data-derived weight
    # counts every training voxel, those past the sides too (the grid is widened in-plane only); plain TV
    # would count those inside the output box (test_support.py checks both)
    assert ctx.report["tv_prior"]["edge_despite"] and trainer.tv_edge() > 0
    n_inner = inner_voxel_count(trainer.grid, *out.bounds())
    assert n_inner < trainer.grid.n_voxels == ctx.report["tv_prior"]["voxels_counted"]
    assert trainer.tv_weight == pytest.approx(cfg.tv_strength * (trainer.noise_variance / trainer.target_power
                                                                 + cfg.model_error ** 2)
                                              * trainer.grid.n_voxels / len(trainer.targets))
    restored = Support.from_plain(trainer.support.to_plain())
    assert reuse_support(scan, out, cfg, restored) and restored.extra["widened"] == wide
    assert carve_support(scan, out, cfg)[1].to_dict() == trainer.grid.to_dict()
    est = estimate(scan, out, dict(preset="preview"), "cpu")
    assert all(e >= t for e, t in zip(est["training_grid"], trainer.grid.shape_xyz))

    off = RunContext(device="cpu", seed=0, settings=dict(preset="preview", extend_cut_sides=False))
    narrow = NerfTrainer(scan, out, NerfConfig.from_settings(off.settings), off)
    assert "widened" not in off.report["support"]
    assert np.all(narrow.grid.bounds()[0] >= olo - 1e-6) and np.all(narrow.grid.bounds()[1] <= ohi + 1e-6)
    # an object inside the field of view is not widened
    inside_fov = _scan(PHANTOM)
    sup, _ = carve_support(inside_fov, default_grid(inside_fov.geometry), NerfConfig())
    assert "widened" not in sup.extra


def test_a_body_off_the_axis_is_trained_past_its_own_side_only():
    """A patient lying off the rotation axis (a table at one side, a C-arm not centred on the body)
    leaves the field of view on one side: the training grid goes on past that side, by about as far
    as the body goes, and not past the other; the part outside is in the support."""
    body = [Ellipsoid((-30.0, 0.0, 0.0), (100.0, 36.0, 95.0), 0.02),
            Ellipsoid((-105.0, 0.0, 0.0), (12.0, 20.0, 12.0), 0.012)]
    scan = _scan(body)
    out = default_grid(scan.geometry)
    support, grid = carve_support(scan, out, NerfConfig())
    faces = support.extra["widened"]["faces"]
    (olo, ohi), (tlo, thi) = out.bounds(), grid.bounds()
    half = (ohi[0] - olo[0]) / 2
    # the body reaches 130 mm along x-, 70 along x+ and 95 along z (under a voxel past the 92 mm box);
    # the edge rays facing x- pass it off its centre, so the disc model reads it high (151 mm)
    assert set(faces) == {"x-"}, faces
    assert 130.0 - half <= faces["x-"]["mm"] <= 1.2 * 130.0 - half, faces
    assert tlo[0] < olo[0] - (130.0 - half) + 1e-6 and thi[0] <= ohi[0] + 1e-6
    h = grid.spacing_xyz[0]
    assert support.mask_on(VolumeGrid((1, 1, 1), (h, h, h), (-105.0, 0.0, 0.0))).all()


def test_training_past_the_sides_removes_the_truncation_error_inside_the_box():
    """With the box ending at the field of view the material outside it is explained by voxels
    inside (a bright rim near the field of view's edge); trained past the sides, that ring and the box
    as a whole are far closer to the truth. Plain TV in both runs, so the widening alone makes the
    difference."""
    scan = _scan(WIDE)
    out = default_grid(scan.geometry)
    truth = voxelize(WIDE, out, supersample=2)
    settings = dict(preset="preview", iterations=150, rays_start=4096, rays_end=8192, snapshot_every=0,
                    eval_every=1000, tv_edge=0.0)
    x = out.origin_xyz[0] + out.spacing_xyz[0] * np.arange(out.shape_xyz[0])
    z = out.origin_xyz[2] + out.spacing_xyz[2] * np.arange(out.shape_xyz[2])
    radius = np.hypot(z[:, None, None], x[None, None, :]) * np.ones(out.shape_zyx)
    radius /= (out.bounds()[1][0] - out.bounds()[0][0]) / 2  # 1 at the field of view's edge
    bands = (radius < 0.5, (radius >= 0.8) & (radius < 1.0), radius >= 0.0)
    errors = {}
    for widen in (True, False):
        ctx = RunContext(device="cpu", seed=0, settings=dict(settings, extend_cut_sides=widen))
        vol = get_method("nerf").reconstruct(scan, out, ctx).array
        assert ("widened" in ctx.report["support"]) == widen
        errors[widen] = [float(np.sqrt(np.mean((vol - truth)[sel] ** 2))) for sel in bands]
    (centre_on, ring_on, all_on), (centre_off, ring_off, all_off) = errors[True], errors[False]
    # measured (1e-3 /mm RMS): the ring 1.65 against 5.80, the box 1.94 against 3.80; the centre 1.60
    # against 1.40 after these 150 iterations (more voxels to fit in them)
    assert ring_on < 0.5 * ring_off and all_on < 0.75 * all_off, errors
    assert centre_on < 1.35 * centre_off, errors


PLATE_BODY = [Ellipsoid((0.0, 0.0, 10.0), (70.0, 36.0, 55.0), 0.02), Ellipsoid((20.0, 0.0, 20.0), (15.0, 20.0, 15.0), 0.03)]
"""A body inside the field of view (about 91 mm radius), with an insert."""
PLATE = [((-160.0, -36.0, -58.0), (160.0, 36.0, -52.0), 0.03)]
"""A table top under it: 6 mm thick, 320 mm wide, as long as the body (so the row edges see air)."""


def _plate_truth(grid):
    """The body and the plate on `grid`, the plate's partial volumes counted."""
    truth = voxelize(PLATE_BODY, grid, supersample=2)
    pts, half = grid.world_points(np.float64), np.asarray(grid.spacing_xyz) / 2
    for lo, hi, mu in PLATE:
        share = np.ones(grid.shape_zyx)
        for a in range(3):
            c = pts[..., a]
            share *= np.clip((np.minimum(c + half[a], hi[a]) - np.maximum(c - half[a], lo[a])) / (2 * half[a]), 0, 1)
        truth = truth + mu * share
    return truth


def _pixel_integrated(geo, ellipsoids, slabs, k=3):
    """Exact line integrals averaged over k x k rays per pixel: a detector pixel integrates over its area,
    which a thin plate seen edge on needs (one ray per pixel reads a 12 mm plate as 8 or 16 mm)."""
    fine = circular_geometry(SID, SDD, np.radians(np.arange(geo.n_views) * 360.0 / geo.n_views),
                             (geo.det_shape[0] * k, geo.det_shape[1] * k),
                             (geo.pixel_pitch[0] / k, geo.pixel_pitch[1] / k), axis="y", parallel=geo.parallel)
    proj = _project(fine, ellipsoids, slabs)
    return proj.reshape(geo.n_views, geo.det_shape[0], k, geo.det_shape[1], k).mean(axis=(2, 4))


def test_the_mass_the_cut_views_miss_says_how_far_a_plate_goes():
    """thin_reach_past_faces: in parallel beams every view's row sums to its slice's mass, so a plate
    12 mm thick and 320 mm wide in a 192 mm field of view reads its 64 mm past x- and x+ to a millimetre,
    and nothing past z- and z+, which it does not leave by; a disc that only just leaves the field of
    view (1 mm) reads under a millimetre or two; one bad view (5 % too bright, as a flat-field error
    gives) among the six that cut nothing moves nothing (the mass they sum is their median); a displaced
    detector reads nothing."""
    geo = circular_geometry(SID, SDD, np.radians(np.arange(16) * 22.5), (DET, DET), (4.0, 4.0), axis="y",
                            parallel=True)
    grid = default_grid(geo)
    lo, hi = grid.bounds()
    centre = (np.asarray(lo) + np.asarray(hi)) / 2
    half = (hi[0] - lo[0]) / 2
    assert half == pytest.approx(96.0)
    thick = [((-160.0, -36.0, -64.0), (160.0, 36.0, -52.0), 0.03)]

    def reach(proj):
        stats = air_statistics(proj)
        return thin_reach_past_faces(proj, geo, stats["air_level"], stats["threshold"], (0, 2), centre)

    proj = _pixel_integrated(geo, PLATE_BODY, thick)
    assert reach(proj) == pytest.approx(np.array([[160.0 - half] * 2, [0.0, 0.0]]), abs=1.0)
    # a plate through the axis stays on the detector in the six views within 34 degrees of looking
    # along it, and what they sum is their median: the bad one among them moves nothing
    level = _pixel_integrated(geo, [], [((-160.0, -36.0, -6.0), (160.0, 36.0, 6.0), 0.03)])
    bad = level.copy()
    bad[4] *= 1.05  # view 4 looks along the plate
    assert reach(level) == pytest.approx(np.array([[160.0 - half] * 2, [0.0, 0.0]]), abs=1.0)
    assert reach(bad) == pytest.approx(reach(level), abs=0.5)
    disc = reach(_pixel_integrated(geo, [Ellipsoid((0.0, 0.0, 0.0), (half + 1, 36.0, half + 1), 0.02)], []))
    assert np.all(disc < 2.0), disc
    assert np.all(reach(_pixel_integrated(geo, PLATE_BODY, [])) == 0.0)
    # a displaced detector misses half the object in every view by design: nothing is read from it
    shifted = circular_geometry(SID, SDD, np.radians(np.arange(16) * 22.5), (DET, DET), (PITCH, PITCH), (0.0, 60.0),
                                axis="y")
    proj = _project(shifted, PLATE_BODY, thick)
    stats = air_statistics(proj)
    assert np.all(thin_reach_past_faces(proj, shifted, stats["air_level"], stats["threshold"], (0, 2), centre) == 0)


def test_a_table_wider_than_the_field_of_view_is_trained_past_by_default(monkeypatch):
    """A thin plate leaving the field of view puts too little into the edge rays for the disc model to
    read anything going on past the sides it leaves by; the mass the cut views miss does, so by default
    (`measure_thin_sides`) the sides the support reaches are widened by that much, the plan and the
    message say which, `info` too, and the reconstruction inside the box, the body above all, comes out
    closer to the truth than with the measurement off. A body whose sides only just leave the field of
    view reads too little to widen anything (`widen_reached_sides`, THIN_FRACTION at least, widened it
    37 mm past every side); that setting still gives a table THIN_FRACTION at least where asked."""
    geo = _geometry()
    grid = default_grid(geo)
    lo, hi = grid.bounds()
    half = max(hi[0] - lo[0], hi[2] - lo[2]) / 2
    proj = _project(geo, PLATE_BODY, PLATE)
    threshold = air_statistics(proj)["threshold"]
    cut = detector_edges_cut(proj, threshold)
    assert cut == ["columns-", "columns+"]
    disc = plan_lateral(geo, cut, grid, proj, threshold)
    assert disc is None or not ({"x-", "x+"} & set(disc.faces())), disc
    assert plan_for_scan(proj, geo, threshold, grid, measure_thin=False) == disc
    plan = plan_for_scan(proj, geo, threshold, grid)
    assert set(plan.thin) == {"x-", "x+"} <= set(plan.faces())
    for face in plan.thin:
        # the plate goes 68 mm past the box's sides; this orbit's wide fan (300 mm from the axis, the
        # body 1/3 of that) reads it short, about 45 mm (the 1000 mm orbit of make_table_ct.py: 68.6
        # against 66.5)
        assert 0.5 * (160.0 - half) < plan.faces()[face][0] < 160.0 - half, plan.faces()
    assert "something thin such as a table top goes on" in describe_faces(plan.summary())
    forced = plan_for_scan(proj, geo, threshold, grid, reached_sides=True, measure_thin=False)
    assert set(forced.thin) >= {"x-", "x+"}
    for face in forced.thin:
        assert forced.faces()[face][0] == pytest.approx(THIN_FRACTION * half)
    both = plan_for_scan(proj, geo, threshold, grid, reached_sides=True)
    for face in ("x-", "x+"):
        assert both.faces()[face][0] == pytest.approx(max(plan.faces()[face][0], THIN_FRACTION * half))
    # a fixed fraction asked for wins
    assert plan_lateral(geo, cut, grid, proj, threshold, fraction=0.25, faces_reached=("x-", "x+")).thin == ()
    # a body only just leaving the field of view (1 mm): the support reaches every side, nothing is widened
    just = _project(geo, [Ellipsoid((0.0, 0.0, 0.0), (half + 1, 36.0, half + 1), 0.02)])
    just_threshold = air_statistics(just)["threshold"]
    assert plan_for_scan(just, geo, just_threshold, grid) is None
    assert len(plan_for_scan(just, geo, just_threshold, grid, reached_sides=True, measure_thin=False).thin) == 4

    scan = ScanData(proj, geo, "synthetic", "<table>")
    from CTNeRFReconLib.cli import info_dict  # `info` says the same before any run
    assert info_dict(scan)["support"]["widened"] == plan.summary()
    assert info_dict(_scan(WIDE))["support"]["widened"]["thin"] == []
    truth = _plate_truth(grid)
    z = grid.origin_xyz[2] + grid.spacing_xyz[2] * np.arange(grid.shape_xyz[2])
    body = np.broadcast_to((z > -40.0)[:, None, None], grid.shape_zyx)
    settings = dict(preset="preview", iterations=150, rays_start=4096, rays_end=8192, snapshot_every=0,
                    eval_every=1000, tv_edge=0.0)
    errors = {}
    import CTNeRFReconLib.lateral_extension as lateral

    planned = []
    monkeypatch.setattr(lateral, "plan_for_scan", lambda *a, **k: planned.append(1) or plan_for_scan(*a, **k))
    for measured in (False, True):
        said = []
        ctx = RunContext(device="cpu", seed=0, settings=dict(settings, measure_thin_sides=measured),
                         on_message=said.append)
        planned.clear()
        get_method("nerf").check_memory(scan, grid, ctx.settings, "cpu")  # as the worker does, first
        vol = get_method("nerf").reconstruct(scan, grid, ctx).array
        assert len(planned) == 1  # the memory check and the trainer plan the widening once (it may carve)
        widened = ctx.report["support"].get("widened") or {"faces": {}, "thin": []}
        if measured:
            assert set(widened["thin"]) == set(plan.thin), widened
            assert any(m.startswith("the object is wider than the field of view") and
                       "x- and x+: reached by the object, where something thin" in m for m in said), said
        else:
            assert not ({"x-", "x+"} & set(widened["faces"])), widened
        assert not any(m.startswith("hint:") for m in said), said
        errors[measured] = [float(np.sqrt(np.mean((vol - truth)[sel] ** 2))) for sel in (body, np.ones_like(body))]
    (body_off, all_off), (body_read, all_read) = errors[False], errors[True]
    # measured (1e-3 /mm RMS): the body 1.38 against 2.08, the box 2.97 against 3.63
    assert body_read < 0.8 * body_off and all_read < 0.9 * all_off, errors
