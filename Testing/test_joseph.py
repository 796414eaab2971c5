"""Joseph's rule (fused.joseph_line_integrals): kernels against the PyTorch reference, and both
against RTK's own Joseph projector (itk-rtk), the independent reference, on a tilted, offset
cone-beam geometry read through our RTK adapter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from CTNeRFReconLib import fused, kernels
from CTNeRFReconLib.rays import all_pixel_indices, view_rays

from test_kernels import DEVICES, built, grads, grid_case, need_device  # noqa: F401 - fixtures


@pytest.mark.parametrize("device", DEVICES)
def test_joseph_kernel_matches_reference(built, device):
    need_device(device)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        vol, origin, spacing, (o, d, tn, tf) = grid_case(n=300, dtype=dtype, device=device)
        vol.requires_grad_(True)
        out = fused.JosephLineIntegrals.apply(vol, origin, spacing, o, d, tn, tf)
        ref = fused.joseph_line_integrals_reference(vol, origin, spacing, o, d, tn, tf)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        assert bool((out[:3] == 0).all()), "rays that miss the box must integrate to exactly zero"
        # the case's box reaches a voxel beyond the centres: a ray grazing only that border meets no slab
        assert bool((out[3:] >= 0).all()) and float((out[3:] > 0).double().mean()) > 0.9
        (g_out,), (g_ref,) = grads(out, (vol,)), grads(ref, (vol,))
        torch.testing.assert_close(g_out, g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_joseph_gradcheck_size_one_axes_and_reductions(built, device, monkeypatch):
    need_device(device)
    vol, origin, spacing, (o, d, tn, tf) = grid_case((3, 4, 5), n=8, dtype=torch.float64, device=device, miss=1)
    vol.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: fused.JosephLineIntegrals.apply(v, origin, spacing, o, d, tn, tf),
                                    (vol,))
    for shape in ((1, 4, 5), (5, 1, 3), (2, 3, 1)):
        vol, origin, spacing, (o, d, tn, tf) = grid_case(shape, n=19, dtype=torch.float64, device=device)
        torch.testing.assert_close(fused.joseph_line_integrals(vol, origin, spacing, o, d, tn, tf),
                                   fused.joseph_line_integrals_reference(vol, origin, spacing, o, d, tn, tf),
                                   rtol=1e-10, atol=1e-12)
    if device == "cpu":
        vol, origin, spacing, (o, d, tn, tf) = grid_case(n=200, dtype=torch.float64)
        vol.requires_grad_(True)
        got = []
        for mode in ("buffers", "atomics"):
            monkeypatch.setenv(kernels.CPU_GRAD_ENV, mode)
            got.append(grads(fused.JosephLineIntegrals.apply(vol, origin, spacing, o, d, tn, tf), (vol,))[0])
        torch.testing.assert_close(got[0], got[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_joseph_kernel_fast_range_edges_match_reference(built, device):
    """The kernels take the planes a ray crosses wholly inside the grid by a path without tests
    (ctnerf_render.h, joseph_fast_planes) and the rest by the general one. Rays along the grid's axes
    (in-plane slope exactly 0), slopes of 1e-7 and 1e-3, in-plane positions on the hull's faces, a
    margin's width inside them and between voxel centres, and spans that stop inside a slab, on every
    major axis: where the two paths meet, the integrals and gradients are the reference's."""
    need_device(device)
    shape_zyx = (7, 9, 11)
    n_xyz = shape_zyx[::-1]
    rays_o, rays_d, t_near, t_far = [], [], [], []
    for major in range(3):
        b, c = [a for a in range(3) if a != major]
        for pos in (0.0, 0.0004, 0.5, 2.0, 3.25):
            for top in (False, True):
                ub = n_xyz[b] - 1 - pos if top else pos
                vc = n_xyz[c] - 1 - 0.5 * pos if top else 1.5 * pos
                for slope in (0.0, 1e-7, -1e-7, 1e-3, -0.37):
                    for span in ((-2.0, n_xyz[major] + 1.0), (0.2, n_xyz[major] - 1.7), (3.6, 3.9)):
                        o = [0.0, 0.0, 0.0]
                        o[major], o[b], o[c] = 0.0, ub, vc
                        d = [0.0, 0.0, 0.0]
                        d[major], d[b], d[c] = 1.0, slope, -0.5 * slope
                        for sign in (1.0, -1.0):
                            dd = [sign * x for x in d]
                            oo = list(o)
                            if sign < 0:  # the same segment walked backwards
                                oo = [o[a] + d[a] * (span[0] + span[1]) for a in range(3)]
                            rays_o.append(oo)
                            rays_d.append(dd)
                            t_near.append(span[0])
                            t_far.append(span[1])
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        g = torch.Generator().manual_seed(3)
        vol = torch.rand(shape_zyx, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        vol.requires_grad_(True)
        origin = torch.zeros(3, dtype=dtype, device=device)
        spacing = torch.ones(3, dtype=dtype, device=device)
        o, d, tn, tf = (torch.tensor(x, dtype=dtype, device=device) for x in (rays_o, rays_d, t_near, t_far))
        out = fused.JosephLineIntegrals.apply(vol, origin, spacing, o, d, tn, tf)
        ref = fused.joseph_line_integrals_reference(vol, origin, spacing, o, d, tn, tf)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        assert float((ref > 0).double().mean()) > 0.9, "the rays must cross the grid"
        (g_out,), (g_ref,) = grads(out, (vol,)), grads(ref, (vol,))
        torch.testing.assert_close(g_out, g_ref, rtol=tol, atol=tol)


def test_joseph_integrates_a_linear_field_exactly_and_agrees_with_fine_sampling():
    """Inside the grid a field linear in x, y, z is reproduced exactly by trilinear interpolation,
    and the midpoint rule integrates it exactly: rays that enter and leave through the faces normal
    to their major axis must match the analytic integral to rounding. Elsewhere (end slabs cut by
    side faces) the rule is first order at the two ends only: within 2 % of 4000 stratified samples
    on a 9-13 voxel grid."""
    shape = (9, 13, 11)
    spacing = torch.tensor([1.5, 0.7, 2.0], dtype=torch.float64)
    origin = torch.tensor([-3.0, 1.0, 2.0], dtype=torch.float64)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    vol = 1.0 + 0.2 * x + 0.1 * y + 0.3 * z
    # rays along x through the interior, with a small tilt: major axis x, entering and leaving at
    # the x faces of the voxel-centre hull
    n = 50
    g = torch.Generator().manual_seed(3)
    f64 = dict(generator=g, dtype=torch.float64)
    start = torch.stack([torch.full((n,), -5.0, dtype=torch.float64), 2 + 5 * torch.rand(n, **f64),
                         4 + 10 * torch.rand(n, **f64)], 1)
    d = torch.nn.functional.normalize(torch.stack([torch.ones(n, dtype=torch.float64),
                                                   0.05 * torch.randn(n, **f64), 0.05 * torch.randn(n, **f64)], 1),
                                      dim=1)
    lo = origin
    hi = origin + spacing * (torch.tensor(shape[::-1], dtype=torch.float64) - 1)
    tn = (lo[0] - start[:, 0]) / d[:, 0]
    tf = (hi[0] - start[:, 0]) / d[:, 0]
    p0, p1 = start + tn[:, None] * d, start + tf[:, None] * d
    assert bool(((p0[:, 1:] > lo[1:]) & (p0[:, 1:] < hi[1:]) & (p1[:, 1:] > lo[1:]) & (p1[:, 1:] < hi[1:])).all())
    mid = (p0 + p1) / 2 - origin
    c = mid / spacing  # index coordinates of the midpoint; the field is linear, its mean is at the midpoint
    exact = (1.0 + 0.2 * c[:, 0] + 0.1 * c[:, 1] + 0.3 * c[:, 2]) * (tf - tn)
    ours = fused.joseph_line_integrals_reference(vol, origin, spacing, start, d, tn, tf)
    torch.testing.assert_close(ours, exact, rtol=1e-12, atol=1e-12)
    from test_kernels import make_rays
    from CTNeRFReconLib.rays import clip_to_box
    o, dd, _, _ = make_rays(300, lo - 3 * spacing, hi + 3 * spacing, torch.float64, "cpu")
    tn, tf = clip_to_box(o, dd, lo.numpy(), hi.numpy())
    smooth = torch.sin(x / 3) + torch.cos(y / 4) + z / 5 + 2
    ours = fused.joseph_line_integrals_reference(smooth, origin, spacing, o, dd, tn, tf)
    fine = fused.grid_line_integrals_reference(smooth, origin, spacing, o, dd, tn, tf, 4000)
    assert float((ours - fine).abs().max() / fine.abs().max()) < 0.02


def test_joseph_matches_rtk_joseph_projector(built, tmp_path):
    """Our rule on rays from our RTK geometry adapter against RTK's JosephForwardProjection of the
    same volume (tilted, offset views from test_formats_rtk). A wrong major axis, plane weight or
    in-plane index would show as a relative RMS of several percent."""
    pytest.importorskip("itk", reason="itk-rtk is the independent reference projector")
    from rtk_joseph import joseph, rel_rms, rtk_geometry, write_rtk_files
    from scipy.ndimage import gaussian_filter
    from test_formats_rtk import DET_ORIGIN, DET_SIZE, DET_SPACING, VIEWS

    from CTNeRFReconLib.formats import load_scan

    rng = np.random.default_rng(5)
    vol = gaussian_filter(rng.uniform(0.0, 1.0, (28, 24, 30)), 1.0).astype(np.float32) * 0.05
    vol[6:20, 5:18, 3:12] += 0.03  # off-centre in x: the mirrored control below must differ
    spacing, origin = (6.0, 7.0, 5.5), (-87.0, -80.5, -74.25)
    geom = rtk_geometry(VIEWS)
    expected = joseph(vol, origin, spacing, geom, DET_SIZE, DET_ORIGIN, DET_SPACING)
    write_rtk_files(tmp_path / "case", geom, expected, DET_ORIGIN, DET_SPACING)
    scan = load_scan(tmp_path / "case")
    lo = np.asarray(origin)
    hi = lo + np.asarray(spacing) * (np.asarray(vol.shape[::-1]) - 1)
    rays = view_rays(scan.geometry, *all_pixel_indices(scan.geometry), lo, hi, dtype=torch.float64)
    args = (torch.as_tensor(vol, dtype=torch.float64), origin, spacing, rays.origins, rays.directions,
            rays.t_near, rays.t_far)
    ours = fused.joseph_line_integrals(*args).numpy().reshape(expected.shape)
    assert expected.max() > 1.0
    err = rel_rms(ours, expected)
    assert err < 1e-3, f"relative RMS {err:.5f} between our Joseph rule and RTK's"  # measured 3.1e-4
    for v in range(len(VIEWS)):
        assert rel_rms(ours[v], expected[v]) < 3e-3, f"view {v}"
    # the comparison can fail: the volume mirrored along x (a wrong axis sign) is far off
    wrong = fused.joseph_line_integrals(torch.flip(args[0], dims=[2]), *args[1:]).numpy().reshape(expected.shape)
    assert rel_rms(wrong, expected) > 0.05
