"""The training rays (nerf/ray_table.py): kept, or computed per batch on a large scan, they are the same rays
and the same measurements, and a run trains to the same volume either way."""
from __future__ import annotations

import numpy as np
import torch

from CTNeRFReconLib.methods import RunContext, get_method
from CTNeRFReconLib.nerf import ray_table
from CTNeRFReconLib.nerf.ray_table import RayTable
from CTNeRFReconLib.rays import all_pixel_indices, view_rays
from CTNeRFReconLib.render import centre_bounds

from nerf_case import small_phantom_case


def test_kept_and_computed_rays_are_the_same(monkeypatch):
    scan, ref = small_phantom_case(views=6, det=40, n=24)
    defects = np.zeros(scan.projections.shape, dtype=bool)
    defects[:, 5, :] = True  # a dead row: no ray there
    defects[2, :, 17] = True
    views = np.array([0, 2, 3, 5])
    # the box is smaller than the field of view, so some rays miss it and are left out
    lo, hi = centre_bounds(ref.grid)
    lo, hi = lo * 0.6, hi * 0.6
    # build in chunks of one view, as a large scan is built
    monkeypatch.setattr(ray_table, "BUILD_CHUNK_RAYS", 40 * 40)
    kept = RayTable(scan.geometry, views, lo, hi, scan.projections, defects)
    computed = RayTable(scan.geometry, views, lo, hi, scan.projections, defects, stored_bytes=0)
    assert kept.stored and not computed.stored
    # a kept ray is 8 float32 and its measurement; a computed one is its pixel (int32) and its measurement
    assert kept.nbytes() == 36 * len(kept) and computed.nbytes() == 8 * len(computed)

    # what one pass over every pixel gives (the rays the table must hold)
    v, r, c = all_pixel_indices(scan.geometry, views)
    every = view_rays(scan.geometry, v, r, c, lo, hi)
    hit = (every.t_far > every.t_near + 1e-6) & ~torch.as_tensor(defects[v, r, c])
    misses = int((every.t_far <= every.t_near + 1e-6).sum())
    assert misses > 100 and int(hit.sum()) > 1000  # some rays miss the smaller box; the rest are kept
    assert np.array_equal(kept.hit_mask, hit.numpy().reshape(len(views), 40, 40))
    assert np.array_equal(computed.hit_mask, kept.hit_mask)
    sel = torch.nonzero(hit).reshape(-1)
    assert torch.equal(kept.targets, torch.as_tensor(scan.projections[v, r, c])[sel])
    assert torch.equal(computed.targets, kept.targets)

    idx = torch.sort(torch.randint(0, len(kept), (500,), generator=torch.Generator().manual_seed(3))).values
    expected = (every.origins[sel][idx], every.directions[sel][idx], every.t_near[sel][idx], every.t_far[sel][idx])
    for table in (kept, computed):
        for got, want in zip(table.rays(idx), expected):
            assert torch.equal(got, want)
    for got, want in zip(computed.span(10, 60), kept.span(10, 60)):
        assert torch.equal(got, want)
    assert torch.equal(computed.chords(50), kept.chords(50))


def test_a_run_trains_the_same_with_rays_computed_per_batch():
    scan, ref = small_phantom_case(views=8, det=32, n=24, noise_i0=2e4)
    settings = dict(preset="preview", iterations=40, rays_start=2048, rays_end=4096, snapshot_every=0,
                    eval_every=20, checkpoint_every=0, holdout_views=2)
    a = get_method("nerf").reconstruct(scan, ref.grid, RunContext(device="cpu", settings=settings))
    b = get_method("nerf").reconstruct(scan, ref.grid, RunContext(device="cpu",
                                                                  settings={**settings, "stored_rays_bytes": 0}))
    assert np.array_equal(a.array, b.array)
    assert float(np.abs(a.array).max()) > 0


def test_the_hit_test_is_the_rays_own_on_every_kind_of_geometry():
    """rays.view_hits (a view at a time over its pixel grid) decides as view_rays does (per pixel): on a cone
    beam with a tilted, offset detector and on a parallel beam, for a box the rays partly miss."""
    from CTNeRFReconLib.geometry import circular_geometry
    from CTNeRFReconLib.rays import view_hits

    angles = np.radians(np.arange(7) * 51.4 + 3.0)
    geometries = [circular_geometry(300.0, 450.0, angles, (30, 41), (2.1, 1.7), det_offset=(4.0, -9.0), axis="y"),
                  circular_geometry(300.0, 450.0, angles, (30, 41), (1.4, 1.1), axis="z", parallel=True)]
    # the detector's tilt: a view's u and v turned a little about its normal
    g = geometries[0]
    turn = np.radians(4.0)
    g.det_u[:], g.det_v[:] = (np.cos(turn) * g.det_u + np.sin(turn) * g.det_v,
                              -np.sin(turn) * g.det_u + np.cos(turn) * g.det_v)
    lo, hi = np.array([-14.0, -9.0, -11.0]), np.array([16.0, 12.5, 10.0])
    for geometry in geometries:
        v, r, c = all_pixel_indices(geometry)
        rays = view_rays(geometry, v, r, c, lo, hi)
        expected = (rays.t_far > rays.t_near + 1e-6).numpy().reshape(geometry.n_views, *geometry.det_shape)
        assert 0.1 < expected.mean() < 0.9
        assert np.array_equal(view_hits(geometry, np.arange(geometry.n_views), lo, hi), expected)
