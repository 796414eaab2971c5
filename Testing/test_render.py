"""The PyTorch renderer against exact line integrals of analytic ellipsoids, and the ray geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from CTNeRFReconLib.geometry import VolumeGrid, circular_geometry
from CTNeRFReconLib.phantom import Ellipsoid, chord_lengths, phantom_line_integrals, phantom_values, shepp_logan_3d
from CTNeRFReconLib.rays import all_pixel_indices, clip_to_box, view_rays
from CTNeRFReconLib.render import RenderConfig, VoxelField, line_integrals


def _field(ellipsoids):
    return lambda p: torch.as_tensor(phantom_values(ellipsoids, p.detach().double().numpy()), dtype=p.dtype)


@pytest.mark.parametrize("parallel", [False, True])
def test_line_integrals_of_ellipsoids_are_exact(parallel):
    phantom = shepp_logan_3d(scale_mm=60.0) + [Ellipsoid((20.0, -10.0, 15.0), (12.0, 7.0, 9.0), 0.01, 30.0)]
    geo = circular_geometry(400.0, 650.0, np.radians([0.0, 41.0, 97.0, 230.0]), (20, 26), (7.0, 7.0),
                            det_offset=(5.0, -9.0), axis="y", parallel=parallel)
    grid = VolumeGrid.centered((70, 70, 70), (2.0, 2.0, 2.0))
    v, r, c = all_pixel_indices(geo)
    rays = view_rays(geo, v, r, c, *grid.bounds(), dtype=torch.float64)
    exact = phantom_line_integrals(phantom, rays.origins.numpy(), rays.directions.numpy())
    ours = line_integrals(_field(phantom), rays, RenderConfig(n_samples=1500)).numpy()
    peak = exact.max()
    assert peak > 0.5  # the rays do cross the phantom
    assert np.sqrt(np.mean((ours - exact) ** 2)) / peak < 0.005
    assert np.abs(ours - exact).max() / peak < 0.02


def test_chord_of_a_sphere_through_its_centre():
    sphere = Ellipsoid((10.0, 0.0, 0.0), (5.0, 5.0, 5.0), 1.0)
    o = np.array([[10.0, -100.0, 0.0], [10.0, -100.0, 4.0], [10.0, -100.0, 6.0]])
    d = np.array([[0.0, 1.0, 0.0]] * 3)
    np.testing.assert_allclose(chord_lengths(sphere, o, d), [10.0, 6.0, 0.0], atol=1e-12)


def test_rays_pass_through_their_pixel_and_miss_cleanly():
    geo = circular_geometry(500.0, 800.0, np.radians([33.0]), (9, 11), (4.0, 3.0), det_offset=(2.0, 1.0), axis="z")
    grid = VolumeGrid.centered((10, 10, 10), (5.0, 5.0, 5.0))
    v, r, c = all_pixel_indices(geo)
    rays = view_rays(geo, v, r, c, *grid.bounds(), dtype=torch.float64)
    pix = geo.pixel_positions(0).reshape(-1, 3)
    to_pix = pix - rays.origins.numpy()
    cross = np.cross(to_pix, rays.directions.numpy())
    assert np.abs(cross).max() < 1e-9  # each ray runs through its own pixel centre
    # a point on a ray projects back onto that ray's pixel
    mid = rays.origins.numpy() + rays.directions.numpy() * (rays.t_near + rays.t_far).numpy()[:, None] / 2
    np.testing.assert_allclose(geo.project_points(mid, 0), np.stack([r, c], 1), atol=1e-9)
    # rays that miss a box have zero length, and integrate to exactly zero
    o = torch.tensor([[0.0, 100.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    tn, tf = clip_to_box(o, d, np.full(3, -10.0), np.full(3, 10.0))
    assert float(tf - tn) == 0.0


def test_voxel_field_of_a_constant_block():
    grid = VolumeGrid.centered((8, 6, 4), (2.0, 2.0, 2.0))
    vol = torch.full(grid.shape_zyx, 0.5, dtype=torch.float64)
    field = VoxelField(vol, grid)
    o = torch.tensor([[-50.0, 0.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    lo, hi = grid.bounds()
    half = np.asarray(grid.spacing_xyz) / 2
    tn, tf = clip_to_box(o, d, lo + half, hi - half)  # between the outermost voxel centres (Joseph)
    from CTNeRFReconLib.rays import RayBatch
    val = line_integrals(field, RayBatch(o, d, tn, tf), RenderConfig(n_samples=64))
    assert float(val) == pytest.approx(0.5 * (8 - 1) * 2.0, rel=1e-9)
    with pytest.raises(ValueError, match="does not match grid"):
        VoxelField(torch.zeros(3, 3, 3), grid)
