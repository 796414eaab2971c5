"""The object's support carved from the projections (support.py): safe on real data, and worth it.

Every case is exact line integrals (closed-form chords) on the small RTK-frame orbit of the nerf
tests, the default grid (the box every view sees); "carved" must never touch an object voxel.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from CTNeRFReconLib.data import ScanData, Volume
from CTNeRFReconLib.fov import default_grid
from CTNeRFReconLib.geometry import circular_geometry
from CTNeRFReconLib.phantom import Ellipsoid, phantom_line_integrals, shepp_logan_3d, voxelize
from CTNeRFReconLib.rays import all_pixel_indices, clip_to_box, view_rays
from CTNeRFReconLib.support import faces_warning, object_support

SID, SDD, VIEWS, DET, PITCH = 300.0, 450.0, 16, 48, 6.0


def _geometry(views=VIEWS, det=(DET, DET)):
    return circular_geometry(SID, SDD, np.radians(np.arange(views) * 360.0 / views), det, (PITCH, PITCH), axis="y")


def _rays(geo):
    v, r, c = all_pixel_indices(geo)
    big = np.full(3, 2 * SDD)
    return view_rays(geo, v, r, c, -big, big, dtype=torch.float64)


def _project(geo, ellipsoids=(), slabs=()):
    """Exact line integrals of ellipsoids plus boxes ((lo, hi, mu) each)."""
    rays = _rays(geo)
    o, d = rays.origins.numpy(), rays.directions.numpy()
    p = phantom_line_integrals(list(ellipsoids), o, d) if ellipsoids else np.zeros(len(o))
    for lo, hi, mu in slabs:
        tn, tf = clip_to_box(rays.origins, rays.directions, lo, hi)
        p = p + mu * (tf - tn).numpy()
    return p.reshape(geo.n_views, *geo.det_shape).astype(np.float32)


def _truth(grid, ellipsoids=(), slabs=()):
    """Voxels holding any material (supersampled partial volumes count)."""
    vol = voxelize(list(ellipsoids), grid, supersample=3) if ellipsoids else np.zeros(grid.shape_zyx)
    pts = grid.world_points(np.float64)
    half = np.asarray(grid.spacing_xyz) / 2
    for lo, hi, _ in slabs:  # a voxel touching the box holds some of it
        inside = np.all((pts + half > np.asarray(lo)) & (pts - half < np.asarray(hi)), axis=-1)
        vol = vol + inside
    return vol > 0


PHANTOM = shepp_logan_3d(57.6)


def test_carving_keeps_the_whole_object_and_removes_most_air():
    geo = _geometry()
    grid = default_grid(geo)
    for i0 in (0.0, 1e4):
        proj = _project(geo, PHANTOM)
        if i0:
            proj = -np.log(np.random.default_rng(1).poisson(i0 * np.exp(-proj)).clip(1, None) / i0).astype(np.float32)
        sup = object_support(proj, geo, grid)
        assert sup.found, sup.reason
        truth = _truth(grid, PHANTOM)
        assert not np.any(truth & ~sup.mask), "an object voxel was carved"
        air_removed = np.sum(~sup.mask & ~truth) / np.sum(~truth)
        assert air_removed > 0.75, air_removed
        assert sup.box_fraction < 0.5
        assert sup.faces_reached == [] and faces_warning(sup.faces_reached, grid) is None
        info = sup.summary()
        assert info["found"] and info["fraction"] == pytest.approx(sup.mask.mean(), abs=1e-4)
        if i0:
            assert info["noise_sigma"] > 0


def test_an_offset_air_level_still_carves_safely():
    """Flat-fielding that leaves air at +0.02 (not 0): carving is relative to the estimated air level."""
    geo = _geometry()
    grid = default_grid(geo)
    proj = _project(geo, PHANTOM) + 0.02
    sup = object_support(proj, geo, grid)
    truth = _truth(grid, PHANTOM)
    if sup.found:
        assert sup.air_level == pytest.approx(0.02, abs=2e-3)
        assert not np.any(truth & ~sup.mask)
        assert np.sum(~sup.mask & ~truth) / np.sum(~truth) > 0.75
    else:  # refusing is allowed, with a reason
        assert sup.reason
    # an air level far from zero against the object's line integrals is no air at all: no carving
    far = object_support(_project(geo, PHANTOM) + 0.3, geo, grid)
    assert not far.found and "air" in far.reason


def test_an_object_wider_than_the_field_of_view_is_not_carved_laterally():
    """No ray sees air across it: the lateral extent stays the whole grid; air above and below goes."""
    geo = _geometry()
    grid = default_grid(geo)
    wide = [Ellipsoid((0.0, 0.0, 0.0), (140.0, 30.0, 140.0), 0.02)]
    sup = object_support(_project(geo, wide), geo, grid)
    truth = _truth(grid, wide)
    assert sup.found, sup.reason
    assert not np.any(truth & ~sup.mask)
    (x0, y0, z0), (x1, y1, z1) = sup.box_index
    nx, ny, nz = grid.shape_xyz
    assert (x0, z0, x1, z1) == (0, 0, nx - 1, nz - 1)
    assert y1 - y0 + 1 < ny  # the axial extent is still carved from the rows that see air
    # every voxel of the object's slab of the grid is kept, right to the grid's lateral faces
    mid = ny // 2
    assert sup.mask[:, mid, :].all()
    # and the user is told: the support reaches the lateral faces (x and z here; y is the axis), not y's
    assert sup.faces_reached == ["x-", "x+", "z-", "z+"]
    assert sup.summary()["faces_reached"] == ["x-", "x+", "z-", "z+"]
    line = faces_warning(sup.faces_reached, grid)
    assert "x-, x+, z-, z+" in line and f"--grid-size {nx} {ny} {nz}" in line
    # the trainer says it before any training (the panel's log pane shows these lines)
    from CTNeRFReconLib.methods import RunContext
    from CTNeRFReconLib.nerf.config import NerfConfig
    from CTNeRFReconLib.nerf.train import NerfTrainer

    said = []
    ctx = RunContext(device="cpu", seed=0, settings=dict(preset="preview"), on_message=said.append)
    NerfTrainer(ScanData(_project(geo, wide), geo, "synthetic", "<wide>"), grid,
                NerfConfig.from_settings(ctx.settings), ctx)
    assert any(m.startswith("warning: the object reaches the box's x-, x+, z-, z+") for m in said), said
    assert ctx.report["support"]["faces_reached"] == ["x-", "x+", "z-", "z+"]


def test_a_detector_too_short_for_the_object_keeps_the_axial_extent():
    """The object leaves the detector at the top and bottom: the edge rows see object, so nothing
    is carved along the axis, and no object voxel is carved at all."""
    geo = _geometry()
    grid = default_grid(geo)
    tall = [Ellipsoid((0.0, 0.0, 0.0), (45.0, 400.0, 40.0), 0.02)]
    sup = object_support(_project(geo, tall), geo, grid)
    truth = _truth(grid, tall)
    assert sup.found, sup.reason
    assert not np.any(truth & ~sup.mask)
    (x0, y0, z0), (x1, y1, z1) = sup.box_index
    assert (y0, y1) == (0, grid.shape_xyz[1] - 1)
    assert x1 - x0 + 1 < grid.shape_xyz[0]  # laterally it is carved
    assert sup.faces_reached == ["y-", "y+"]  # cut along the axis, and only there
    # the same with the detector's rows cut to half: still the whole axial extent of the grid
    short = _geometry(det=(DET // 2, DET))
    g2 = default_grid(short)
    s2 = object_support(_project(short, tall), short, g2)
    assert s2.found and (s2.box_index[0][1], s2.box_index[1][1]) == (0, g2.shape_xyz[1] - 1)
    assert not np.any(_truth(g2, tall) & ~s2.mask)


def test_a_table_in_the_beam_is_kept():
    """A flat slab under the object (a patient table, a sample holder) is object: never carved."""
    geo = _geometry()
    grid = default_grid(geo)
    table = ((-64.0, -1000.0, -70.0), (-58.0, 1000.0, 70.0), 0.01)  # 6 mm thick, along the whole axis
    sup = object_support(_project(geo, PHANTOM, [table]), geo, grid)
    truth = _truth(grid, PHANTOM, [table])
    assert sup.found, sup.reason
    assert not np.any(truth & ~sup.mask)
    slab_only = _truth(grid, (), [table])
    assert sup.mask[slab_only].all()


def test_no_air_anywhere_carves_nothing():
    geo = _geometry()
    grid = default_grid(geo)
    block = [Ellipsoid((0.0, 0.0, 0.0), (140.0, 400.0, 140.0), 0.02)]
    sup = object_support(_project(geo, block), geo, grid)
    assert not sup.found and sup.reason
    assert sup.summary()["found"] is False and sup.fraction == 1.0


def test_truncated_projections_are_recognised_and_the_edge_scale_is_kept_by_default():
    """detector_edges_cut names the detector's edges the object goes on beyond (wider than the field of
    view: the column edges; longer than the detector, or a table along the axis: the row edges), and
    the trainer keeps the edge-scaled TV, its weight counting the training voxels past the sides too,
    and says in spite of what in run.json and a message; with tv_edge_when_truncated off it falls back
    to plain TV at the weight of the voxels inside the box, saying why. A whole object in the field of
    view gets the edge scale with nothing to say."""
    from CTNeRFReconLib.methods import RunContext
    from CTNeRFReconLib.nerf.config import NerfConfig
    from CTNeRFReconLib.nerf.train import NerfTrainer
    from CTNeRFReconLib.support import air_statistics, detector_edges_cut

    geo = _geometry()
    grid = default_grid(geo)
    table = ((-64.0, -1000.0, -70.0), (-58.0, 1000.0, 70.0), 0.01)
    cases = {"whole": (_project(geo, PHANTOM), []),
             "wide": (_project(geo, [Ellipsoid((0.0, 0.0, 0.0), (140.0, 30.0, 140.0), 0.02)]),
                      ["columns-", "columns+"]),
             "tall": (_project(geo, [Ellipsoid((0.0, 0.0, 0.0), (45.0, 400.0, 40.0), 0.02)]), ["rows-", "rows+"]),
             # 140 mm wide, it also leaves the 192 mm field of view laterally in the oblique views
             "table": (_project(geo, PHANTOM, [table]), ["columns-", "columns+", "rows-", "rows+"])}
    for name, (proj, edges) in cases.items():
        assert detector_edges_cut(proj, air_statistics(proj)["threshold"]) == edges, name

    def trainer_for(name, **settings):
        messages = []
        ctx = RunContext(device="cpu", seed=0, settings=dict(preset="preview", **settings),
                         on_message=messages.append)
        trainer = NerfTrainer(ScanData(cases[name][0], geo, "synthetic", f"<{name}>"), grid,
                              NerfConfig.from_settings(ctx.settings), ctx)
        return trainer, ctx.report, messages

    whole, report, _ = trainer_for("whole")
    tv = report["tv_prior"]
    assert tv["plain_because"] is None and tv["edge_despite"] is None and whole.tv_edge() > 0
    assert tv["voxels_past_sides_counted"] == 0

    # the default: the edge scale kept on the truncated scan, run.json says in spite of what, and the
    # weight counts the widened grid's voxels past the sides: the inside count's times their share
    edge, report, messages = trainer_for("wide")
    tv = report["tv_prior"]
    assert "widened" in report["support"], report["support"]
    assert tv["plain_because"] is None and "columns-, columns+" in tv["edge_despite"]
    assert edge.tv_edge() > 0 and tv["edge_attenuation"] == edge.tv_edge()
    past = tv["voxels_past_sides_counted"]
    assert past > 0 and tv["voxels_counted"] == int(np.prod(edge.grid.shape_xyz))
    assert any(m.startswith("edge-scaled TV on truncated projections") and f"the {past} training voxels" in m
               and "tv_edge_when_truncated=false" in m for m in messages), messages

    # the user's choice: plain TV there, at the weight of the voxels inside the box
    plain, report, messages = trainer_for("wide", tv_edge_when_truncated=False)
    tv_plain = report["tv_prior"]
    assert "columns-, columns+" in tv_plain["plain_because"] and plain.tv_edge() == 0.0
    assert tv_plain["edge_attenuation"] == 0.0 and tv_plain["edge_despite"] is None
    assert tv_plain["voxels_past_sides_counted"] == 0
    assert tv_plain["voxels_counted"] == tv["voxels_counted"] - past
    assert tv["weight"] == pytest.approx(tv_plain["weight"] * tv["voxels_counted"] / tv_plain["voxels_counted"])
    assert any(m.startswith("plain TV: the object goes on beyond") and "(tv_edge_when_truncated=false)" in m
               for m in messages), messages


def test_noisy_air_is_measured_as_noise_and_not_read_as_a_truncated_object():
    """On a scan with few photons the air's noise is wider than the histogram bins around the air level;
    its estimate must come from the air peak itself. It once came out 0 at 1e4 photons here, the
    threshold fell to 1 % of p99, and noisy air along every edge read as an object beyond the detector
    (plain TV for a whole object in the field of view)."""
    from CTNeRFReconLib.support import air_statistics, detector_edges_cut

    geo = _geometry()
    rng = np.random.default_rng(0)
    whole = _project(geo, PHANTOM)
    wide = _project(geo, [Ellipsoid((0.0, 0.0, 0.0), (140.0, 30.0, 140.0), 0.02)])
    for i0 in (9e4, 1e4, 3e3):
        def noisy(p):
            counts = rng.poisson(i0 * np.exp(-p.astype(np.float64))).clip(1, None)
            return (-np.log(counts / i0)).astype(np.float32)
        stats = air_statistics(noisy(whole))
        # log-transformed Poisson counts in air: variance 1 / I0
        assert stats["noise_sigma"] == pytest.approx(i0 ** -0.5, rel=0.15), (i0, stats)
        assert detector_edges_cut(noisy(whole), stats["threshold"]) == [], i0
        wide_noisy = noisy(wide)
        assert detector_edges_cut(wide_noisy, air_statistics(wide_noisy)["threshold"]) == ["columns-", "columns+"], i0


def test_nerf_on_the_default_grid_is_as_good_with_support_and_trains_fewer_voxels():
    """The whole pipeline on a small phantom without a reference grid: support on is at least as
    accurate (scored on the phantom's grid) and trains on fewer voxels."""
    from CTNeRFReconLib.methods import RunContext
    from CTNeRFReconLib.metrics import score_volumes
    from CTNeRFReconLib.nerf.config import NerfConfig
    from CTNeRFReconLib.nerf.train import NerfTrainer

    geo = _geometry()
    proj = _project(geo, PHANTOM)
    proj = -np.log(np.random.default_rng(0).poisson(1e5 * np.exp(-proj)).clip(1, None) / 1e5).astype(np.float32)
    scan = ScanData(proj, geo, "synthetic", "<support test>")
    grid = default_grid(geo)
    ref = Volume(voxelize(PHANTOM, grid, supersample=2), grid)
    fast = dict(preset="preview", iterations=150, rays_start=4096, rays_end=8192, snapshot_every=0,
                eval_every=50, checkpoint_every=0)
    results = {}
    for support in (False, True):
        ctx = RunContext(device="cpu", seed=0, settings=dict(fast, support=support))
        trainer = NerfTrainer(scan, grid, NerfConfig.from_settings(ctx.settings), ctx)
        vol = trainer.run()
        s = score_volumes(ref, vol)
        results[support] = (s["psnr"], trainer.grid.n_voxels, ctx.report["support"])
    (p_off, n_off, _), (p_on, n_on, rep) = results[False], results[True]
    assert rep["found"] and rep["training_voxels"] == n_on
    assert n_on < 0.6 * n_off
    assert p_on >= p_off - 0.1, results


def test_the_support_sets_the_voxel_where_the_air_coarsened_it():
    """`support_sets_voxel` (the high preset's): where the cap on the field of view's box coarsened the
    training voxel, the support's box trains at a finer one (never finer than the output's) within the
    same cap; the mask still holds every object voxel, the carve's box and its faces stay, a checkpoint's
    support is taken back as it is and a run without the setting does not take it; where the cap did not
    bite, nothing changes."""
    from dataclasses import replace

    from CTNeRFReconLib.methods import RunContext
    from CTNeRFReconLib.nerf.config import NerfConfig
    from CTNeRFReconLib.nerf.train import NerfTrainer, carve_support, reuse_support
    from CTNeRFReconLib.support import Support

    geo = _geometry()
    scan = ScanData(_project(geo, PHANTOM), geo, "synthetic", "<support voxel test>")
    out = default_grid(geo)
    cap = out.n_voxels // 4
    plain = NerfConfig(max_training_voxels=cap)
    finer = replace(plain, support_sets_voxel=True)
    assert NerfConfig.from_settings({"preset": "high"}).support_sets_voxel
    assert not any(NerfConfig.from_settings({"preset": p}).support_sets_voxel for p in ("preview", "standard"))
    coarse_sup, coarse = carve_support(scan, out, plain)
    sup, grid = carve_support(scan, out, finer)
    h_out, h_coarse, h = (min(g.spacing_xyz) for g in (out, coarse, grid))
    assert h_coarse > 1.3 * h_out  # the cap coarsened it
    assert 0.999 * h_out <= h < 0.95 * h_coarse, (h_out, h, h_coarse)
    assert grid.n_voxels <= cap < 1.3 * grid.n_voxels  # as fine as the cap allows, within rounding
    for a, b in zip(sup.grid.bounds(), coarse_sup.grid.bounds()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert sup.faces_reached == coarse_sup.faces_reached
    assert sup.extra["voxel_from_support"]["training_mm"] == pytest.approx(h, abs=1e-4)
    truth = _truth(sup.grid, PHANTOM)
    assert not (truth & ~sup.mask).any(), "an object voxel was left out of the finer support"
    assert sup.mask.mean() < 0.6
    # the checkpoint's support, as resume and export read it
    restored = Support.from_plain(sup.to_plain())
    assert not reuse_support(scan, out, plain, Support.from_plain(sup.to_plain()))
    assert reuse_support(scan, out, finer, restored)
    assert carve_support(scan, out, finer)[1].to_dict() == grid.to_dict()
    # the trainer reports it, and trains on that grid
    ctx = RunContext(device="cpu", seed=0, settings=dict(preset="preview", max_training_voxels=cap,
                                                          support_sets_voxel=True))
    trainer = NerfTrainer(scan, out, NerfConfig.from_settings(ctx.settings), ctx)
    assert trainer.grid.to_dict() == grid.to_dict()
    assert ctx.report["support"]["voxel_from_support"]["carved_mm"] == pytest.approx(h_coarse, abs=1e-4)
    # a time limit that buys too few iterations at the finer voxel is told so, with the fix
    least = trainer._finer_voxel_iterations(trainer.FINER_VOXEL_MIN_ITERATIONS)  # scaled to this case's views
    few = trainer._finer_voxel_too_short(least - 1)
    assert few and "support_sets_voxel=false" in few and f"{min(grid.spacing_xyz):.3g}" in few
    assert f"under about {least} at {trainer._finer_voxel_scan()} the" in few
    assert trainer._finer_voxel_scan().startswith(f"{scan.n_views} views")
    assert trainer._finer_voxel_too_short(least) is None
    plain_ctx = RunContext(device="cpu", seed=0, settings=dict(preset="preview", max_training_voxels=cap))
    assert NerfTrainer(scan, out, NerfConfig.from_settings(plain_ctx.settings), plain_ctx)._finer_voxel_too_short(1) is None
    # no cap to lift: the same grid either way
    roomy = NerfConfig(max_training_voxels=10 * out.n_voxels)
    assert carve_support(scan, out, replace(roomy, support_sets_voxel=True))[1].to_dict() == \
        carve_support(scan, out, roomy)[1].to_dict()
