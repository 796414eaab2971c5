"""Line integrals through a voxel grid or a TensoRF-VM field, and the grid's total variation: fused
kernels or the PyTorch path.

`grid_line_integrals`, `joseph_line_integrals`, `vm_line_integrals` and `total_variation` run the
fused kernels (kernels/, see kernels.py) when they are built for the tensors' device, and the
`*_reference` functions here otherwise.
The references are plain torch (grid_sample and elementwise ops, chunked over rays) and define
the semantics the kernels are tested against:

* sample k of ray i: dt = (t_far - t_near) / S (0 if t_far <= t_near), t = t_near + (k + off) dt,
  off = 0.5 without jitter, else `jitter_offsets` (a counter-based hash of seed, i and k, the same
  integers as the kernels' hash, so both paths sample the same points);
* grid: trilinear interpolation of a (z, y, x) volume at (p - origin) / spacing, zero outside
  the voxel centres' hull (grid_sample, zeros padding, align_corners=True);
* VM: q = 2 (p - box_min) / (box_max - box_min) - 1; features plane x line per mode and channel
  (layout in nerf/field.py), mu = softplus(basis . features + bias);
* output: sum over samples of mu * dt;
* Joseph (grid, no samples): the ray's major axis a is the one of largest |direction / spacing|;
  plane k of a contributes the bilinear value where the ray crosses it times the length in t of
  the slab [k - 1/2, k + 1/2] inside the ray's span along a;
* TV: for each axis the mean |forward difference|, summed; an axis of length 1 adds 0.

Gradients flow to the volume (grid) and to planes, lines, basis and bias (VM); when rays or
geometry need gradients the reference path is used, since the kernels do not provide them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .kernels import cpu_grad_mode, kernels_available

__all__ = ["grid_line_integrals", "joseph_line_integrals", "vm_line_integrals", "grid_line_integrals_reference",
           "joseph_line_integrals_reference", "vm_line_integrals_reference", "total_variation",
           "total_variation_reference", "tv_penalty_reference", "jitter_offsets", "kernels_available", "FusedInputError"]

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x6B43A9B5
DEFAULT_CHUNK_SAMPLES = 1 << 22
"""Samples evaluated at once by the reference path (bounds its forward working memory)."""


class FusedInputError(ValueError):
    """Inputs of a line-integral function have the wrong shape, dtype or device."""


# -- jitter: the kernels' hash, in int64 torch arithmetic ----------------------------------------
def _mix32(x):
    """The kernels' mix32 on int64 tensors or Python ints holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32  # both factors < 2^32 and 2^31: no int64 overflow
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def jitter_offsets(seed: int, ray_index: torch.Tensor, n_samples: int, dtype: torch.dtype) -> torch.Tensor:
    """Offsets in [0, 1) of (rays, samples) for a seed >= 0: hash_uniform of ctnerf_render.h."""
    seed = int(seed)
    if seed < 0:
        raise FusedInputError(f"jitter seed must be >= 0 for offsets, got {seed}")
    s = seed & 0xFFFFFFFFFFFFFFFF
    h0 = _mix32(((s & _MASK32) + _mix32(s >> 32)) & _MASK32)
    ray = ray_index.to(torch.int64)[:, None] & _MASK32
    k = torch.arange(n_samples, device=ray_index.device, dtype=torch.int64)[None, :]
    h = _mix32(ray ^ h0)
    h = _mix32((h + k) & _MASK32)
    return (h >> 8).to(dtype) * (1.0 / 16777216.0)


def _sample_distances(t_near, t_far, n_samples: int, jitter_seed: int, first_ray: int):
    """(n, S) sample distances and (n,) bin lengths; ray numbers start at first_ray for the hash."""
    dt = torch.where(t_far > t_near, (t_far - t_near) / n_samples, torch.zeros_like(t_near))
    k = torch.arange(n_samples, device=t_near.device, dtype=t_near.dtype)[None, :]
    if jitter_seed < 0:
        kk = k + 0.5
    else:
        idx = torch.arange(first_ray, first_ray + t_near.shape[0], device=t_near.device)
        kk = k + jitter_offsets(jitter_seed, idx, n_samples, t_near.dtype)
    return t_near[:, None] + kk * dt[:, None], dt


# -- input checks ---------------------------------------------------------------------------------
def _vec3(value, like: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() != 3:
        raise FusedInputError(f"{name} must have 3 values (x, y, z), got {t.numel()}")
    return t


def _check_rays(like: torch.Tensor, origins, dirs, t_near, t_far, n_samples: int) -> None:
    n = origins.shape[0] if origins.dim() == 2 else -1
    shapes = {"origins": (origins, (n, 3)), "dirs": (dirs, (n, 3)), "t_near": (t_near, (n,)),
              "t_far": (t_far, (n,))}
    for name, (t, want) in shapes.items():
        if n < 0 or tuple(t.shape) != want:
            raise FusedInputError(f"{name} must have shape {want if n >= 0 else '(N, 3)'}, got {tuple(t.shape)}")
        if t.dtype != like.dtype or t.device != like.device:
            raise FusedInputError(f"{name} is {t.dtype} on {t.device}; it must match the field's "
                                  f"{like.dtype} on {like.device} (convert with .to())")
    if int(n_samples) < 1:
        raise FusedInputError(f"n_samples must be >= 1, got {n_samples}")


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise FusedInputError(f"{name} must be float32 or float64, got {t.dtype}")


def _check_volume(volume: torch.Tensor) -> None:
    _check_float(volume, "volume")
    if volume.dim() != 3 or volume.numel() == 0:
        raise FusedInputError(f"volume must be a non-empty (z, y, x) tensor, got shape {tuple(volume.shape)}")


def _checked_grid_inputs(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, n_samples: int):
    """The checks every grid integral makes before any work; returns origin and spacing as (3,) tensors."""
    _check_volume(volume)
    _check_rays(volume, origins, dirs, t_near, t_far, n_samples)
    origin = _vec3(origin_xyz, volume, "origin_xyz")
    spacing = _vec3(spacing_xyz, volume, "spacing_xyz")
    if spacing.device.type == "cpu" and not bool((spacing != 0).all()):  # no GPU sync for the check
        raise FusedInputError(f"spacing_xyz must be non-zero on every axis, got {spacing.tolist()}")
    return origin, spacing


def _use_kernels(device: torch.device, *no_grad_tensors: torch.Tensor) -> bool:
    if any(t.requires_grad for t in no_grad_tensors) and torch.is_grad_enabled():
        return False
    return kernels_available(device)


# -- (a) voxel grid -------------------------------------------------------------------------------
def grid_line_integrals_reference(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far,
                                  n_samples: int, jitter_seed: int = -1,
                                  chunk_samples: int = DEFAULT_CHUNK_SAMPLES) -> torch.Tensor:
    """PyTorch path of `grid_line_integrals` (grid_sample, chunked over rays)."""
    origin = _vec3(origin_xyz, volume, "origin_xyz")
    spacing = _vec3(spacing_xyz, volume, "spacing_xyz")
    vol = volume
    # grid_sample maps [-1, 1] onto a single voxel for an axis of length 1; padding such an axis
    # with a zero slab on both sides keeps the "zero beyond the voxel centres" rule exact
    pad = []
    for axis in range(3):  # x, y, z = last, middle, first dimension
        one = vol.shape[2 - axis] == 1
        pad += [1, 1] if one else [0, 0]
        if one:
            origin = origin - spacing * torch.eye(3, dtype=vol.dtype, device=vol.device)[axis]
    if any(pad):
        vol = F.pad(vol[None, None], pad)[0, 0]
    size = torch.tensor([vol.shape[2], vol.shape[1], vol.shape[0]], dtype=vol.dtype, device=vol.device)
    scale = 2.0 / (spacing * (size - 1))  # world offset from the origin -> grid_sample coordinate
    per_chunk = max(1, int(chunk_samples) // int(n_samples))
    out = []
    for start in range(0, origins.shape[0], per_chunk):
        sl = slice(start, start + per_chunk)
        t, dt = _sample_distances(t_near[sl], t_far[sl], n_samples, jitter_seed, start)
        pts = origins[sl, None, :] + t[..., None] * dirs[sl, None, :]
        g = (pts - origin) * scale - 1.0
        mu = F.grid_sample(vol[None, None], g.reshape(1, 1, 1, -1, 3), mode="bilinear",
                           padding_mode="zeros", align_corners=True).reshape(t.shape)
        out.append(mu.sum(dim=1) * dt)
    return torch.cat(out) if out else volume.new_zeros((0,))


class GridLineIntegrals(torch.autograd.Function):
    """Fused forward and backward of the grid line integral (gradient to the volume only)."""

    @staticmethod
    def forward(ctx, volume, origin, spacing, origins, dirs, t_near, t_far, n_samples, jitter_seed):
        ctx.save_for_backward(volume, origin, spacing, origins, dirs, t_near, t_far)
        ctx.n_samples, ctx.jitter_seed = int(n_samples), int(jitter_seed)
        return torch.ops.ctnerf.grid_line_integrals(volume, origin, spacing, origins, dirs, t_near, t_far,
                                                    ctx.n_samples, ctx.jitter_seed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        volume, origin, spacing, origins, dirs, t_near, t_far = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.ctnerf.grid_line_integrals_backward(
                grad_out.contiguous(), volume, origin, spacing, origins, dirs, t_near, t_far, ctx.n_samples,
                ctx.jitter_seed, cpu_grad_mode())
        return grad, None, None, None, None, None, None, None, None


def grid_line_integrals(volume: torch.Tensor, origin_xyz, spacing_xyz, origins: torch.Tensor,
                        dirs: torch.Tensor, t_near: torch.Tensor, t_far: torch.Tensor, n_samples: int,
                        jitter_seed: int = -1) -> torch.Tensor:
    """Integral of a trilinearly interpolated (z, y, x) volume along each ray, (N,).

    origin_xyz: world position of voxel (0, 0, 0)'s centre; spacing_xyz: voxel size (x, y, z).
    jitter_seed < 0: midpoint samples; >= 0: jittered by the shared counter-based hash.
    """
    origin, spacing = _checked_grid_inputs(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, n_samples)
    if _use_kernels(volume.device, origin, spacing, origins, dirs, t_near, t_far):
        return GridLineIntegrals.apply(volume, origin, spacing, origins, dirs, t_near, t_far,
                                       int(n_samples), int(jitter_seed))
    return grid_line_integrals_reference(volume, origin, spacing, origins, dirs, t_near, t_far,
                                         int(n_samples), int(jitter_seed))


# -- (a') voxel grid, Joseph's rule ---------------------------------------------------------------
def _lerp_taps(pos: torch.Tensor, n: int):
    """Indices (always valid) and weights (0 outside) of linear interpolation with zero padding
    beyond the voxel centres on one axis: the kernels' lerp_weights."""
    hit = (pos > -1) & (pos < n)
    safe = torch.where(hit, pos, torch.zeros_like(pos))
    i = torch.floor(safe)
    frac = safe - i
    i = i.to(torch.int64)
    lo_in, hi_in = i >= 0, i + 1 < n
    i0 = torch.where(lo_in, i, torch.zeros_like(i))
    i1 = torch.where(hi_in, i + 1, torch.full_like(i, n - 1))
    w0 = torch.where(lo_in & hit, 1 - frac, torch.zeros_like(frac))
    w1 = torch.where(hi_in & hit, frac, torch.zeros_like(frac))
    return i0, i1, w0, w1


def joseph_line_integrals_reference(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far,
                                    chunk_samples: int = DEFAULT_CHUNK_SAMPLES) -> torch.Tensor:
    """PyTorch path of `joseph_line_integrals`: every plane of the ray's major axis is visited
    (planes outside the ray's slab range get length 0), bilinear gathers, chunked over rays."""
    origin = _vec3(origin_xyz, volume, "origin_xyz")
    spacing = _vec3(spacing_xyz, volume, "spacing_xyz")
    n_xyz = (volume.shape[2], volume.shape[1], volume.shape[0])
    strides = (1, n_xyz[0], n_xyz[0] * n_xyz[1])
    flat = volume.reshape(-1)
    start = (origins - origin) / spacing
    step = dirs / spacing
    major = step.abs().argmax(dim=1)
    order, parts = [], []
    for a in range(3):
        b, c = (1, 2) if a == 0 else (0, 2) if a == 1 else (0, 1)
        rays_of_axis = torch.nonzero(major == a).reshape(-1)
        k = torch.arange(n_xyz[a], device=volume.device, dtype=volume.dtype)[None, :]
        per_chunk = max(1, int(chunk_samples) // n_xyz[a])
        for sel in torch.split(rays_of_axis, per_chunk):
            st, sp, tn, tf = start[sel], step[sel], t_near[sel], t_far[sel]
            s = sp[:, a]
            valid = (tf > tn) & (s.abs() > 0)
            s_safe = torch.where(valid, s, torch.ones_like(s))
            c_near, c_far = st[:, a] + tn * s, st[:, a] + tf * s
            lo, hi = torch.minimum(c_near, c_far)[:, None], torch.maximum(c_near, c_far)[:, None]
            length = (torch.minimum(hi, k + 0.5) - torch.maximum(lo, k - 0.5)).clamp_min(0) / s_safe.abs()[:, None]
            length = torch.where(valid[:, None], length, torch.zeros_like(length))
            t = (k - st[:, a:a + 1]) / s_safe[:, None]
            u0, u1, wu0, wu1 = _lerp_taps(st[:, b:b + 1] + t * sp[:, b:b + 1], n_xyz[b])
            v0, v1, wv0, wv1 = _lerp_taps(st[:, c:c + 1] + t * sp[:, c:c + 1], n_xyz[c])
            base = k.to(torch.int64) * strides[a]
            sb, sc = strides[b], strides[c]
            mu = (wv0 * (wu0 * flat[base + v0 * sc + u0 * sb] + wu1 * flat[base + v0 * sc + u1 * sb])
                  + wv1 * (wu0 * flat[base + v1 * sc + u0 * sb] + wu1 * flat[base + v1 * sc + u1 * sb]))
            order.append(sel)
            parts.append((length * mu).sum(dim=1))
    if not parts:
        return volume.new_zeros((origins.shape[0],))
    return volume.new_zeros((origins.shape[0],)).index_put((torch.cat(order),), torch.cat(parts))


class JosephLineIntegrals(torch.autograd.Function):
    """Fused forward and backward of Joseph's rule (gradient to the volume only)."""

    @staticmethod
    def forward(ctx, volume, origin, spacing, origins, dirs, t_near, t_far):
        ctx.save_for_backward(volume, origin, spacing, origins, dirs, t_near, t_far)
        return torch.ops.ctnerf.joseph_line_integrals(volume, origin, spacing, origins, dirs, t_near, t_far)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        volume, origin, spacing, origins, dirs, t_near, t_far = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.ctnerf.joseph_line_integrals_backward(
                grad_out.contiguous(), volume, origin, spacing, origins, dirs, t_near, t_far, cpu_grad_mode())
        return grad, None, None, None, None, None, None


def joseph_line_integrals(volume: torch.Tensor, origin_xyz, spacing_xyz, origins: torch.Tensor,
                          dirs: torch.Tensor, t_near: torch.Tensor, t_far: torch.Tensor) -> torch.Tensor:
    """Integral of a trilinearly interpolated (z, y, x) volume along each ray by Joseph's rule, (N,).

    One bilinear lookup per crossing of a plane of voxel centres normal to the ray's major axis,
    weighted by the length of that plane's slab inside [t_near, t_far] (ctnerf_render.h, (a')).
    Same geometry arguments as `grid_line_integrals`; no sample count, no jitter.
    """
    origin, spacing = _checked_grid_inputs(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, 1)
    if _use_kernels(volume.device, origin, spacing, origins, dirs, t_near, t_far):
        return JosephLineIntegrals.apply(volume, origin, spacing, origins, dirs, t_near, t_far)
    return joseph_line_integrals_reference(volume, origin, spacing, origins, dirs, t_near, t_far)


# -- (b) TensoRF-VM field -------------------------------------------------------------------------
# (plane's last axis, plane's first axis, line axis) per mode, as x = 0, y = 1, z = 2
_VM_AXES = ((0, 1, 2), (0, 2, 1), (1, 2, 0))


def vm_pre_activation_reference(planes, lines, basis, bias, q: torch.Tensor) -> torch.Tensor:
    """Decoder input at box coordinates q (P, 3) in [-1, 1]: bias + basis . (plane x line)."""
    c = planes.shape[1]
    pre = bias.expand(q.shape[0])
    for m, (a, b, l) in enumerate(_VM_AXES):
        pg = torch.stack([q[:, a], q[:, b]], dim=-1).reshape(1, 1, -1, 2)
        p = F.grid_sample(planes[m:m + 1], pg, mode="bilinear", padding_mode="zeros",
                          align_corners=True).reshape(c, -1)
        lg = torch.stack([torch.zeros_like(q[:, l]), q[:, l]], dim=-1).reshape(1, 1, -1, 2)
        li = F.grid_sample(lines[m:m + 1, :, :, None], lg, mode="bilinear", padding_mode="zeros",
                           align_corners=True).reshape(c, -1)
        pre = pre + torch.einsum("c,cp,cp->p", basis[m * c:(m + 1) * c], p, li)
    return pre


def vm_line_integrals_reference(planes, lines, basis, bias, box_min, box_max, origins, dirs, t_near, t_far,
                                n_samples: int, jitter_seed: int = -1,
                                chunk_samples: int = DEFAULT_CHUNK_SAMPLES // 4) -> torch.Tensor:
    """PyTorch path of `vm_line_integrals` (grid_sample per mode, chunked over rays)."""
    lo = _vec3(box_min, planes, "box_min")
    hi = _vec3(box_max, planes, "box_max")
    per_chunk = max(1, int(chunk_samples) // int(n_samples))
    out = []
    for start in range(0, origins.shape[0], per_chunk):
        sl = slice(start, start + per_chunk)
        t, dt = _sample_distances(t_near[sl], t_far[sl], n_samples, jitter_seed, start)
        pts = origins[sl, None, :] + t[..., None] * dirs[sl, None, :]
        q = (2.0 * (pts - lo) / (hi - lo) - 1.0).reshape(-1, 3)
        mu = F.softplus(vm_pre_activation_reference(planes, lines, basis, bias, q)).reshape(t.shape)
        out.append(mu.sum(dim=1) * dt)
    return torch.cat(out) if out else planes.new_zeros((0,))


class VMLineIntegrals(torch.autograd.Function):
    """Fused forward and backward of the VM-field line integral (gradients to planes, lines, basis, bias)."""

    @staticmethod
    def forward(ctx, planes, lines, basis, bias, box_min, box_max, origins, dirs, t_near, t_far, n_samples,
                jitter_seed):
        ctx.save_for_backward(planes, lines, basis, bias, box_min, box_max, origins, dirs, t_near, t_far)
        ctx.n_samples, ctx.jitter_seed = int(n_samples), int(jitter_seed)
        return torch.ops.ctnerf.vm_line_integrals(planes, lines, basis, bias, box_min, box_max, origins, dirs,
                                                  t_near, t_far, ctx.n_samples, ctx.jitter_seed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        if not any(ctx.needs_input_grad[:4]):
            return (None,) * 12
        grads = torch.ops.ctnerf.vm_line_integrals_backward(grad_out.contiguous(), *saved, ctx.n_samples,
                                                            ctx.jitter_seed, cpu_grad_mode())
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])]
        return (*grads, None, None, None, None, None, None, None, None)


def vm_line_integrals(planes: torch.Tensor, lines: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor,
                      box_min, box_max, origins: torch.Tensor, dirs: torch.Tensor, t_near: torch.Tensor,
                      t_far: torch.Tensor, n_samples: int, jitter_seed: int = -1) -> torch.Tensor:
    """Integral of softplus(VM decoder) along each ray, (N,).

    planes (3, C, R, R), lines (3, C, L), basis (3C,), bias (1,); box_min/box_max (x, y, z) in
    world units bound the field's [-1, 1]^3. Multiply by a scale afterwards if the field has one.
    """
    _check_float(planes, "planes")
    if planes.dim() != 4 or planes.shape[0] != 3 or planes.shape[2] != planes.shape[3] or planes.numel() == 0:
        raise FusedInputError(f"planes must be (3, C, R, R), got {tuple(planes.shape)}")
    c = planes.shape[1]
    if lines.dim() != 3 or lines.shape[:2] != (3, c) or lines.shape[2] < 1:
        raise FusedInputError(f"lines must be (3, {c}, L), got {tuple(lines.shape)}")
    if tuple(basis.shape) != (3 * c,) or tuple(bias.shape) != (1,):
        raise FusedInputError(f"basis must be ({3 * c},) and bias (1,), got {tuple(basis.shape)} and "
                              f"{tuple(bias.shape)}")
    for name, t in (("lines", lines), ("basis", basis), ("bias", bias)):
        if t.dtype != planes.dtype or t.device != planes.device:
            raise FusedInputError(f"{name} is {t.dtype} on {t.device}; it must match planes' {planes.dtype} "
                                  f"on {planes.device}")
    _check_rays(planes, origins, dirs, t_near, t_far, n_samples)
    lo = _vec3(box_min, planes, "box_min")
    hi = _vec3(box_max, planes, "box_max")
    if lo.device.type == "cpu" and not bool((hi > lo).all()):
        raise FusedInputError(f"box_max must exceed box_min on every axis, got {lo.tolist()} and {hi.tolist()}")
    if _use_kernels(planes.device, lo, hi, origins, dirs, t_near, t_far):
        return VMLineIntegrals.apply(planes, lines, basis, bias, lo, hi, origins, dirs, t_near, t_far,
                                     int(n_samples), int(jitter_seed))
    return vm_line_integrals_reference(planes, lines, basis, bias, lo, hi, origins, dirs, t_near, t_far,
                                       int(n_samples), int(jitter_seed))


# -- (c) total variation ---------------------------------------------------------------------------
def _check_edge(edge: float) -> float:
    edge = float(edge)
    if not math.isfinite(edge) or edge < 0:
        raise FusedInputError(f"the TV edge scale must be finite and >= 0 (0: plain TV), got {edge}")
    return edge


def tv_penalty_reference(diff: torch.Tensor, edge: float) -> torch.Tensor:
    """phi(d) of `total_variation`: |d| for plain TV (edge 0), else edge * log(1 + |d| / edge)."""
    return diff.abs() if edge <= 0 else edge * torch.log1p(diff.abs() / edge)


def total_variation_reference(volume: torch.Tensor, edge: float = 0.0) -> torch.Tensor:
    """PyTorch path of `total_variation`: the sum over axes of the mean phi(forward difference)."""
    edge = _check_edge(edge)
    total = volume.reshape(-1)[0] * 0.0  # a zero that keeps the graph when no axis has differences
    for dim in range(3):
        n = volume.shape[dim]
        if n > 1:
            diff = volume.narrow(dim, 1, n - 1) - volume.narrow(dim, 0, n - 1)
            total = total + tv_penalty_reference(diff, edge).mean()
    return total


class TotalVariation(torch.autograd.Function):
    """Fused forward and backward of the anisotropic TV (one pass each, no temporaries)."""

    @staticmethod
    def forward(ctx, volume, edge):
        ctx.save_for_backward(volume)
        ctx.edge = edge
        return torch.ops.ctnerf.tv(volume, edge)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (volume,) = ctx.saved_tensors
        return torch.ops.ctnerf.tv_backward(grad_out.contiguous(), volume, ctx.edge), None


def total_variation(volume: torch.Tensor, edge: float = 0.0) -> torch.Tensor:
    """Anisotropic total variation of a (z, y, x) volume: for each axis the mean penalty of the
    forward differences, summed (an axis of length 1 adds 0). The penalty is |d| with `edge` 0
    (plain TV), else edge * log(1 + |d| / edge): TV for differences well below the edge scale,
    logarithmic above it, so edges keep their contrast (ctnerf_render.h, (c)). A 0-dim tensor,
    differentiable in the volume.
    Why fused: three differences, their penalties and the backward's slopes are five passes and
    four temporaries of the volume's size in PyTorch; the kernel reads each voxel's neighbours once."""
    _check_volume(volume)
    edge = _check_edge(edge)
    if kernels_available(volume.device):
        return TotalVariation.apply(volume, edge)
    return total_variation_reference(volume, edge)
