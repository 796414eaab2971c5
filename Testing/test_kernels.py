"""Fused renderer kernels against the PyTorch reference: values, gradients, edge cases, fallback.

The CPU build is compiled on first use (about 20 s once, then cached). CUDA cases run only when
a GPU is visible; the CUDA sources are compile-checked separately (test_kernels_cuda_compile.py).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from CTNeRFReconLib import fused, kernels
from CTNeRFReconLib.geometry import VolumeGrid
from CTNeRFReconLib.nerf.field import VMField
from CTNeRFReconLib.render import sample_volume

ROOT = Path(__file__).resolve().parents[1]
HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device visible (torch.cuda.is_available() is False)")),
]


@pytest.fixture(scope="module")
def built():
    """The kernels are built for this process; skips when no C++ compiler exists here."""
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler on PATH: the fused kernels cannot be built here")
    variant = kernels.load_kernels()
    assert variant is not None, f"kernel build failed: {kernels.last_error()}"
    return variant


def need_device(device: str) -> None:
    if not kernels.kernels_available(device):
        pytest.skip(f"fused kernels are not built for {device} in this process")


# -- cases ------------------------------------------------------------------------------------------
def make_rays(n, box_min, box_max, dtype, device, miss=0, seed=0):
    """Cone-like rays from one side of a box through random points inside it; `miss` rays miss."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.as_tensor(box_min, dtype=torch.float64)
    hi = torch.as_tensor(box_max, dtype=torch.float64)
    centre, size = (lo + hi) / 2, hi - lo
    src = centre + torch.tensor([0.3, -0.2, -2.5]) * size.max()
    target = lo + torch.rand(n, 3, generator=g, dtype=torch.float64) * size
    d = torch.nn.functional.normalize(target - src, dim=1)
    o = src.expand(n, 3).clone()
    if miss:
        d[:miss] = torch.nn.functional.normalize(torch.tensor([1.0, 1.0, -0.1], dtype=torch.float64), dim=0)
    from CTNeRFReconLib.rays import clip_to_box
    tn, tf = clip_to_box(o, d, lo.numpy(), hi.numpy())
    return tuple(t.to(device=device, dtype=dtype) for t in (o, d, tn, tf))


def grid_case(shape_zyx=(7, 9, 11), n=37, dtype=torch.float32, device="cpu", miss=3, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    vol = torch.rand(shape_zyx, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    spacing = torch.tensor([1.5, 2.0, 2.5], dtype=torch.float64)
    origin = torch.tensor([-7.0, -8.0, -9.0], dtype=torch.float64)
    n_xyz = torch.tensor(shape_zyx[::-1], dtype=torch.float64)
    # a box a little larger than the voxel-centre hull, so samples also test the zero border
    lo = origin - spacing
    hi = origin + spacing * n_xyz
    rays = make_rays(n, lo, hi, dtype, device, miss=miss, seed=seed)
    return vol, origin.to(device, dtype), spacing.to(device, dtype), rays


def vm_case(c=3, r=6, length=7, n=29, dtype=torch.float32, device="cpu", miss=3, seed=0):
    g = torch.Generator().manual_seed(seed + 2)
    planes = (torch.randn(3, c, r, r, generator=g, dtype=torch.float64) * 0.5).to(device, dtype)
    lines = (torch.randn(3, c, length, generator=g, dtype=torch.float64) * 0.5).to(device, dtype)
    basis = torch.randn(3 * c, generator=g, dtype=torch.float64).to(device, dtype)
    bias = torch.tensor([-0.5], dtype=torch.float64).to(device, dtype)
    lo = torch.tensor([-10.0, -6.0, -4.0], dtype=torch.float64)
    hi = torch.tensor([10.0, 8.0, 5.0], dtype=torch.float64)
    rays = make_rays(n, lo, hi, dtype, device, miss=miss, seed=seed)
    return (planes, lines, basis, bias), (lo.to(device, dtype), hi.to(device, dtype)), rays


def grads(out, inputs):
    weights = torch.linspace(0.5, 1.5, out.shape[0], dtype=out.dtype, device=out.device)
    return torch.autograd.grad((out * weights).sum(), inputs)


# -- build and settings -------------------------------------------------------------------------------
def test_cpu_build_loads_and_registers_both_ops(built):
    assert built in ("cpu", "cuda")
    assert kernels.kernels_available("cpu")
    for op in kernels.OPS:
        assert hasattr(torch.ops.ctnerf, op)
    assert kernels.kernels_available("cuda") == (built == "cuda")


def test_setting_turns_kernels_off(built, monkeypatch):
    monkeypatch.setenv(kernels.MODE_ENV, "off")
    assert not kernels.kernels_available("cpu")
    monkeypatch.setenv(kernels.MODE_ENV, "sometimes")
    assert not kernels.kernels_available("cpu")  # a typo degrades to the PyTorch path
    with pytest.raises(kernels.KernelConfigError, match=kernels.MODE_ENV):
        kernels.kernel_mode()
    monkeypatch.setenv(kernels.CPU_GRAD_ENV, "fast")
    with pytest.raises(kernels.KernelConfigError, match=kernels.CPU_GRAD_ENV):
        kernels.cpu_grad_mode()


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on PATH")
def test_failed_build_degrades_to_torch_path_with_one_warning(tmp_path):
    """A broken compiler must not stop the product: one warning, then the PyTorch renderer."""
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "from CTNeRFReconLib import fused, kernels\n"
        "assert not kernels.kernels_available('cpu')\n"
        "v = torch.ones(2, 3, 4, dtype=torch.float64)\n"
        "o = torch.tensor([[0.5, 1.0, -5.0]], dtype=torch.float64); d = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)\n"
        "out = fused.grid_line_integrals(v, (0, 0, 0), (1, 1, 1), o, d, torch.tensor([5.0], dtype=torch.float64),"
        " torch.tensor([6.0], dtype=torch.float64), 4)\n"
        "print('VALUE', float(out[0]))\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), CTNERF_KERNEL_CACHE=str(tmp_path / "cache"),
               CTNERF_KERNELS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "PyTorch renderer" in warnings[0], proc.stderr
    assert "VALUE 1.0" in proc.stdout  # z from 0 to 1 through ones: the reference integrates to 1


# -- (a) grid line integrals -------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [-1, 12345])
def test_grid_matches_reference_float32(built, device, seed):
    need_device(device)
    vol, origin, spacing, (o, d, tn, tf) = grid_case(device=device)
    vol.requires_grad_(True)
    out = fused.GridLineIntegrals.apply(vol, origin, spacing, o, d, tn, tf, 23, seed)
    ref = fused.grid_line_integrals_reference(vol, origin, spacing, o, d, tn, tf, 23, seed)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert bool((out[:3] == 0).all()), "rays that miss the box must integrate to exactly zero"
    assert bool((out[3:] > 0).all())
    (g_out,), (g_ref,) = grads(out, (vol,)), grads(ref, (vol,))
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


def test_grid_reference_is_the_renderers_trilinear_sampling():
    """The reference equals render.sample_volume (grid_sample on a VolumeGrid) at the same points."""
    vol, origin, spacing, (o, d, tn, tf) = grid_case(dtype=torch.float64, miss=0)
    grid = VolumeGrid((vol.shape[2], vol.shape[1], vol.shape[0]), tuple(spacing.tolist()), tuple(origin.tolist()))
    s = 9
    dt = (tf - tn) / s
    t = tn[:, None] + (torch.arange(s, dtype=vol.dtype) + 0.5)[None] * dt[:, None]
    pts = o[:, None] + t[..., None] * d[:, None]
    expected = (sample_volume(vol, grid, pts.reshape(-1, 3)).reshape(t.shape) * dt[:, None]).sum(1)
    ours = fused.grid_line_integrals_reference(vol, origin, spacing, o, d, tn, tf, s)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_grid_gradcheck_float64(built, device):
    need_device(device)
    vol, origin, spacing, (o, d, tn, tf) = grid_case((3, 4, 5), n=6, dtype=torch.float64, device=device, miss=1)
    vol.requires_grad_(True)
    for seed in (-1, 7):
        assert torch.autograd.gradcheck(
            lambda v: fused.GridLineIntegrals.apply(v, origin, spacing, o, d, tn, tf, 5, seed), (vol,))


@pytest.mark.parametrize("device", DEVICES)
def test_grid_size_one_axis_and_odd_sizes(built, device):
    need_device(device)
    for shape in ((1, 4, 5), (5, 1, 3), (2, 3, 1)):
        vol, origin, spacing, (o, d, tn, tf) = grid_case(shape, n=19, dtype=torch.float64, device=device)
        out = fused.grid_line_integrals(vol, origin, spacing, o, d, tn, tf, 13)
        ref = fused.grid_line_integrals_reference(vol, origin, spacing, o, d, tn, tf, 13)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_grid_empty_batch(built, device):
    need_device(device)
    vol, origin, spacing, (o, d, tn, tf) = grid_case(n=0, device=device, miss=0)
    vol.requires_grad_(True)
    out = fused.grid_line_integrals(vol, origin, spacing, o, d, tn, tf, 8, 3)
    assert out.shape == (0,)
    (g,) = torch.autograd.grad(out.sum(), vol)
    assert g.shape == vol.shape and not bool(g.any())


@pytest.mark.parametrize("device", DEVICES)
def test_grid_non_contiguous_inputs(built, device):
    need_device(device)
    vol, origin, spacing, (o, d, tn, tf) = grid_case(device=device)
    vol_nc = vol.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # same values, transposed strides
    o_nc = o.t().contiguous().t()
    d_nc = torch.stack([d, d], dim=1)[:, 0]
    tn_nc, tf_nc = torch.stack([tn, tf], 1).unbind(1)
    assert not (vol_nc.is_contiguous() or o_nc.is_contiguous() or d_nc.is_contiguous() or tn_nc.is_contiguous())
    vol_nc.requires_grad_(True)
    out = fused.GridLineIntegrals.apply(vol_nc, origin, spacing, o_nc, d_nc, tn_nc, tf_nc, 17, 5)
    ref = fused.grid_line_integrals_reference(vol, origin, spacing, o, d, tn, tf, 17, 5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    (g,) = grads(out, (vol_nc,))
    vol_ref = vol.clone().requires_grad_(True)
    (g_ref,) = grads(fused.grid_line_integrals_reference(vol_ref, origin, spacing, o, d, tn, tf, 17, 5), (vol_ref,))
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["buffers", "atomics"])
def test_grid_cpu_gradient_reductions_agree(built, monkeypatch, mode):
    monkeypatch.setenv(kernels.CPU_GRAD_ENV, mode)
    vol, origin, spacing, (o, d, tn, tf) = grid_case(n=200, dtype=torch.float64)
    vol.requires_grad_(True)
    (g,) = grads(fused.GridLineIntegrals.apply(vol, origin, spacing, o, d, tn, tf, 31, 2), (vol,))
    (g_ref,) = grads(fused.grid_line_integrals_reference(vol, origin, spacing, o, d, tn, tf, 31, 2), (vol,))
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_jitter_is_deterministic_and_follows_the_seed(built, device):
    need_device(device)
    vol, origin, spacing, (o, d, tn, tf) = grid_case(device=device, miss=0)
    a = fused.grid_line_integrals(vol, origin, spacing, o, d, tn, tf, 6, 99)
    b = fused.grid_line_integrals(vol, origin, spacing, o, d, tn, tf, 6, 99)
    c = fused.grid_line_integrals(vol, origin, spacing, o, d, tn, tf, 6, 100)
    mid = fused.grid_line_integrals(vol, origin, spacing, o, d, tn, tf, 6, -1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, rtol=1e-3) and not torch.allclose(a, mid, rtol=1e-3)


def test_jitter_offsets_are_uniform_and_seed_specific():
    idx = torch.arange(4096)
    u = fused.jitter_offsets(5, idx, 64, torch.float64)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.01
    assert float(torch.corrcoef(torch.stack([u[:, :-1].reshape(-1), u[:, 1:].reshape(-1)]))[0, 1]) < 0.02
    assert not torch.equal(u, fused.jitter_offsets(6, idx, 64, torch.float64))
    # seeds above 2^32 use their high half too
    assert not torch.equal(fused.jitter_offsets(1, idx, 8, torch.float64),
                           fused.jitter_offsets(1 + (1 << 32), idx, 8, torch.float64))


# -- (b) VM field line integrals ---------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [-1, 4242])
def test_vm_matches_reference_float32(built, device, seed):
    need_device(device)
    factors, (lo, hi), (o, d, tn, tf) = vm_case(device=device)
    factors = [f.requires_grad_(True) for f in factors]
    out = fused.VMLineIntegrals.apply(*factors, lo, hi, o, d, tn, tf, 21, seed)
    ref = fused.vm_line_integrals_reference(*factors, lo, hi, o, d, tn, tf, 21, seed)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert bool((out[:3] == 0).all()) and bool((out[3:] > 0).all())
    for g, g_ref in zip(grads(out, factors), grads(ref, factors)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_vm_reference_matches_the_fields_decoder():
    """Same layout as nerf/field.py: VMField.pre_activation_at and the reference agree."""
    (planes, lines, basis, bias), (lo, hi), _ = vm_case(c=4, r=9, length=9, dtype=torch.float64)
    field = VMField(4, lo.numpy(), hi.numpy(), mu_scale=1.0).double()
    with torch.no_grad():
        field.basis.copy_(basis)
        field.bias.copy_(bias)
    pts = lo + torch.rand(500, 3, dtype=torch.float64) * (hi - lo)
    q = 2 * (pts - lo) / (hi - lo) - 1
    expected = field.pre_activation_at(planes, lines, pts)
    torch.testing.assert_close(fused.vm_pre_activation_reference(planes, lines, basis, bias, q), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_vm_gradcheck_float64(built, device):
    need_device(device)
    factors, (lo, hi), (o, d, tn, tf) = vm_case(c=2, r=4, length=5, n=5, dtype=torch.float64, device=device,
                                                miss=1)
    factors = tuple(f.requires_grad_(True) for f in factors)
    for seed in (-1, 3):
        assert torch.autograd.gradcheck(
            lambda *f: fused.VMLineIntegrals.apply(*f, lo, hi, o, d, tn, tf, 4, seed), factors)


@pytest.mark.parametrize("device", DEVICES)
def test_vm_empty_batch_odd_sizes_and_non_contiguous(built, device):
    need_device(device)
    factors, (lo, hi), (o, d, tn, tf) = vm_case(c=5, r=7, length=3, n=0, device=device, miss=0)
    factors = [f.requires_grad_(True) for f in factors]
    out = fused.vm_line_integrals(*factors, lo, hi, o, d, tn, tf, 8, 1)
    assert out.shape == (0,)
    for g, f in zip(torch.autograd.grad(out.sum(), factors), factors):
        assert g.shape == f.shape and not bool(g.any())
    (planes, lines, basis, bias), (lo, hi), (o, d, tn, tf) = vm_case(c=5, r=7, length=3, n=23, device=device)
    planes_nc = planes.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)
    lines_nc = lines.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    basis_nc = torch.stack([basis, basis], 1)[:, 0].requires_grad_(True)
    o_nc = o.t().contiguous().t()
    assert not (planes_nc.is_contiguous() or lines_nc.is_contiguous() or basis_nc.is_contiguous())
    out = fused.VMLineIntegrals.apply(planes_nc, lines_nc, basis_nc, bias, lo, hi, o_nc, d, tn, tf, 11, -1)
    ref_in = [planes.clone().requires_grad_(True), lines.clone().requires_grad_(True),
              basis.clone().requires_grad_(True)]
    ref = fused.vm_line_integrals_reference(*ref_in, bias, lo, hi, o, d, tn, tf, 11, -1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads(out, (planes_nc, lines_nc, basis_nc)), grads(ref, ref_in)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["buffers", "atomics"])
def test_vm_cpu_gradient_reductions_agree(built, monkeypatch, mode):
    monkeypatch.setenv(kernels.CPU_GRAD_ENV, mode)
    factors, (lo, hi), (o, d, tn, tf) = vm_case(c=4, r=8, length=6, n=150, dtype=torch.float64)
    factors = [f.requires_grad_(True) for f in factors]
    out = fused.VMLineIntegrals.apply(*factors, lo, hi, o, d, tn, tf, 19, 8)
    ref = fused.vm_line_integrals_reference(*factors, lo, hi, o, d, tn, tf, 19, 8)
    for g, g_ref in zip(grads(out, factors), grads(ref, factors)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


# -- dispatch, checks and operator registration -----------------------------------------------------------
def test_public_functions_pick_the_path(built):
    vol, origin, spacing, (o, d, tn, tf) = grid_case(dtype=torch.float64)
    vol.requires_grad_(True)
    out = fused.grid_line_integrals(vol, origin, spacing, o, d, tn, tf, 9, 1)
    assert type(out.grad_fn).__name__.startswith("GridLineIntegrals")
    # ray gradients are not in the kernels: the reference path (grid_sample) takes over
    o_req = o.clone().requires_grad_(True)
    out_ref = fused.grid_line_integrals(vol, origin, spacing, o_req, d, tn, tf, 9, 1)
    assert not type(out_ref.grad_fn).__name__.startswith("GridLineIntegrals")
    torch.testing.assert_close(out, out_ref)


def test_bad_inputs_are_refused_with_clear_errors(built):
    vol, origin, spacing, (o, d, tn, tf) = grid_case()
    with pytest.raises(fused.FusedInputError, match="dirs must have shape"):
        fused.grid_line_integrals(vol, origin, spacing, o, d[:-1], tn, tf, 4)
    with pytest.raises(fused.FusedInputError, match="must match the field's"):
        fused.grid_line_integrals(vol, origin, spacing, o.double(), d, tn, tf, 4)
    with pytest.raises(fused.FusedInputError, match="n_samples"):
        fused.grid_line_integrals(vol, origin, spacing, o, d, tn, tf, 0)
    with pytest.raises(fused.FusedInputError, match="float32 or float64"):
        fused.grid_line_integrals(vol.half(), origin, spacing, o, d, tn, tf, 4)
    with pytest.raises(fused.FusedInputError, match="dirs must have shape"):
        fused.joseph_line_integrals(vol, origin, spacing, o, d[:-1], tn, tf)
    with pytest.raises(fused.FusedInputError, match="spacing_xyz must be non-zero"):
        fused.joseph_line_integrals(vol, origin, torch.zeros(3), o, d, tn, tf)
    (planes, lines, basis, bias), (lo, hi), _ = vm_case()
    with pytest.raises(fused.FusedInputError, match="box_max must exceed"):
        fused.vm_line_integrals(planes, lines, basis, bias, hi, lo, o, d, tn, tf, 4)
    # the operators check on their own too (TORCH_CHECK), whoever calls them
    with pytest.raises(RuntimeError, match="origins must be"):
        torch.ops.ctnerf.grid_line_integrals(vol, origin, spacing, o[:, :2], d, tn, tf, 4, -1)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.ctnerf.grid_line_integrals(vol, origin, spacing, o.double(), d, tn, tf, 4, -1)
    with pytest.raises(RuntimeError, match="origins must be"):
        torch.ops.ctnerf.joseph_line_integrals(vol, origin, spacing, o[:, :2], d, tn, tf)
    with pytest.raises(RuntimeError, match="lines must be"):
        torch.ops.ctnerf.vm_line_integrals(planes, lines[:, :2], basis, bias, lo, hi, o, d, tn, tf, 4, -1)


def test_opcheck_schemas_and_fake_tensors(built):
    vol, origin, spacing, (o, d, tn, tf) = grid_case(n=8)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.ctnerf.grid_line_integrals.default,
                          (vol, origin, spacing, o, d, tn, tf, 5, 1), test_utils=tests)
    torch.library.opcheck(torch.ops.ctnerf.grid_line_integrals_backward.default,
                          (torch.ones(8), vol, origin, spacing, o, d, tn, tf, 5, 1, 0), test_utils=tests)
    torch.library.opcheck(torch.ops.ctnerf.joseph_line_integrals.default,
                          (vol, origin, spacing, o, d, tn, tf), test_utils=tests)
    torch.library.opcheck(torch.ops.ctnerf.joseph_line_integrals_backward.default,
                          (torch.ones(8), vol, origin, spacing, o, d, tn, tf, 0), test_utils=tests)
    (planes, lines, basis, bias), (lo, hi), (o, d, tn, tf) = vm_case(n=8)
    torch.library.opcheck(torch.ops.ctnerf.vm_line_integrals.default,
                          (planes, lines, basis, bias, lo, hi, o, d, tn, tf, 5, 1), test_utils=tests)
    torch.library.opcheck(torch.ops.ctnerf.vm_line_integrals_backward.default,
                          (torch.ones(8), planes, lines, basis, bias, lo, hi, o, d, tn, tf, 5, 1, 0),
                          test_utils=tests)


# -- (c) total variation ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("edge", [0.0, 0.05])
def test_tv_matches_reference_values_and_gradients(built, device, edge):
    """Plain TV (edge 0) and the edge-scaled log penalty, kernel against the PyTorch path."""
    need_device(device)
    g = torch.Generator().manual_seed(4)
    for shape in ((7, 9, 11), (1, 5, 6), (4, 1, 3), (2, 3, 1), (1, 1, 1)):
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
            vol = torch.rand(shape, generator=g, dtype=torch.float64).to(device, dtype)
            vol[0, 0, 0] = vol.reshape(-1)[-1]  # ties: sign(0) = 0 on both paths
            a = vol.clone().requires_grad_(True)
            b = vol.clone().requires_grad_(True)
            out = fused.TotalVariation.apply(a, edge)
            ref = fused.total_variation_reference(b, edge)
            assert out.shape == () and torch.isfinite(out)
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
            (out * 1.7).backward()
            (ref * 1.7).backward()
            torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)
    # the public function takes the kernel; a constant volume has no variation
    assert type(fused.total_variation(vol.requires_grad_(True), edge).grad_fn).__name__.startswith("TotalVariation")
    assert float(fused.total_variation(torch.ones(3, 4, 5, device=device), edge)) == 0.0


def test_tv_edge_scale_is_tv_below_it_and_logarithmic_above(built):
    """phi(d) = edge * log(1 + |d| / edge): a step far below the edge scale costs what plain TV
    charges, a step 100x above it costs log(101) / 100 of that, so an edge keeps its contrast."""
    vol = torch.zeros(2, 1, 1, dtype=torch.float64)
    for step, ratio in ((1e-7, 1.0), (1.0, math.log(101.0) / 100.0)):
        vol[1] = step
        plain = float(fused.total_variation(vol, 0.0))
        assert plain == pytest.approx(step, rel=1e-12)
        assert float(fused.total_variation(vol, 0.01)) == pytest.approx(ratio * plain, rel=1e-5)
    # the CPU build's own vectorised log1p (ctnerf_render.h, log1p_vec) in float, from 1e-12 to 1e7
    worst = 0.0
    for x in torch.logspace(-12, 7, 400, dtype=torch.float64):
        step = torch.tensor([0.0, float(x)], dtype=torch.float32).reshape(2, 1, 1)
        got = float(torch.ops.ctnerf.tv(step, 1.0))
        worst = max(worst, abs(got / math.log1p(float(step[1])) - 1))
    assert worst < 1e-6, worst
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(fused.FusedInputError, match="edge scale"):
            fused.total_variation(vol, bad)
        with pytest.raises(RuntimeError, match="edge scale"):
            torch.ops.ctnerf.tv(vol, bad)


@pytest.mark.parametrize("edge", [0.0, 0.2])
def test_tv_gradcheck_float64(built, edge):
    vol = torch.rand((3, 4, 5), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: fused.TotalVariation.apply(v, edge), (vol.requires_grad_(True),))
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.ctnerf.tv.default, (vol.detach(), edge), test_utils=tests)
    torch.library.opcheck(torch.ops.ctnerf.tv_backward.default,
                          (torch.tensor(1.0, dtype=torch.float64), vol.detach(), edge), test_utils=tests)


def test_each_copy_of_the_sources_builds_in_its_own_folder(tmp_path, monkeypatch):
    """torch rebuilds when the build flags change, and they name the source folder: two copies of the
    library sharing one build folder (an installed extension and a checkout, a CI clone) rebuilt each
    other's kernels at every switch (17 s on 2 cores). Each source folder has its own build folder."""
    mine = kernels.plan_build("cpu").build_dir
    assert kernels.plan_build("cpu").build_dir == mine, "the same sources, the same folder: built once"
    copy = tmp_path / "kernels"
    shutil.copytree(kernels.source_dir(), copy)
    monkeypatch.setattr(kernels, "source_dir", lambda: copy)
    theirs = kernels.plan_build("cpu").build_dir
    assert theirs != mine and theirs.parent == mine.parent
    assert kernels.cache_root() in mine.parents
