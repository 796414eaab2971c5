"""Per-scan fitting of the deep-prior VM field to the measured line integrals.

One iteration: the generator makes the planes and lines, the field is materialised on the
training grid (dense, exact at voxel centres), plus the detail grid in the refinement phase, a
batch of rays is integrated through that grid (the fused kernel when built, else the PyTorch path;
rays grouped by chord length, each group at its own sample count), and the loss is the relative
MSE to the measured line integrals plus a TV prior on the grid. The ray batch grows during training
(curriculum); an out-of-memory error halves it and the step is retried.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import fused
from ..data import ScanData, Volume
from ..geometry import VolumeGrid
from ..methods import RunContext
from ..rays import all_pixel_indices, view_rays
from ..render import centre_bounds
from .config import NerfConfig
from .detail import DetailGrid
from .field import VMField
from .generator import DirectFactors, FactorGenerator
from .prior_weight import projection_noise_variance, tv_weight_from_data


class _BatchTooLarge(RuntimeError):
    """Raised when a batch would exceed the configured memory budget (treated like an OOM)."""


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, _BatchTooLarge)):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def training_grid(out_grid: VolumeGrid, cfg: NerfConfig) -> VolumeGrid:
    """Axis-aligned training grid over the output grid's box, isotropic, at most max_training_voxels."""
    lo, hi = out_grid.bounds()
    ext = hi - lo
    voxel = cfg.voxel_size or float(min(out_grid.spacing_xyz))
    n = np.maximum(1, np.round(ext / voxel))
    if np.prod(n) > cfg.max_training_voxels:
        voxel *= (np.prod(n) / cfg.max_training_voxels) ** (1 / 3)
        n = np.maximum(1, np.round(ext / voxel))
    # keep the box; spacing follows from the rounded counts so the voxels tile it exactly
    spacing = ext / n
    return VolumeGrid.centered(tuple(int(k) for k in n), tuple(spacing), tuple((lo + hi) / 2))


@dataclass
class TrainState:
    iteration: int = 0
    rays_per_batch: int = 0
    history: list = field(default_factory=list)
    """(iteration, loss, projection_psnr, elapsed_s) rows: the loss curve."""
    elapsed_s: float = 0.0
    rays_per_batch_cap: int = 1 << 30
    """Upper bound on the batch after out-of-memory back-offs."""


class NerfTrainer:
    """Owns the model, the optimiser and the rays of one reconstruction."""

    def __init__(self, scan: ScanData, out_grid: VolumeGrid, cfg: NerfConfig, ctx: RunContext,
                 fdk_volume: Volume | None = None):
        self.scan, self.out_grid, self.cfg, self.ctx = scan, out_grid, cfg, ctx
        self.device = torch.device(ctx.device)
        torch.manual_seed(ctx.seed)
        self.grid = training_grid(out_grid, cfg)
        box_min, box_max = self.grid.bounds()
        self.box = (box_min, box_max)
        proj = scan.projections
        mu_scale = self._attenuation_scale(fdk_volume)
        res = cfg.plane_resolution or max(self.grid.shape_xyz)
        self.field = VMField(cfg.channels, box_min, box_max, mu_scale).to(self.device)
        if cfg.use_generator:
            self.factors = FactorGenerator(cfg.channels, res, cfg.generator_width, cfg.noise_channels,
                                           seed=ctx.seed).to(self.device)
            self.phase = "generator"
        else:
            self.factors = DirectFactors(cfg.channels, res, seed=ctx.seed).to(self.device)
            self.phase = "direct"
        self.detail: DetailGrid | None = None
        """Dense detail added to the field in the direct (refinement) phase; see detail.py."""
        if self.phase == "direct" and cfg.detail_grid:
            self.detail = DetailGrid(self.grid, device=self.device)
        self._make_optimizer()

        # training and held-out views
        views = np.arange(scan.n_views)
        hold = np.zeros(0, dtype=int)
        if cfg.holdout_views > 0 and scan.n_views > cfg.holdout_views + 2:
            hold = np.round(np.linspace(0, scan.n_views, cfg.holdout_views, endpoint=False)
                            + scan.n_views / (2 * cfg.holdout_views)).astype(int) % scan.n_views
        train_views = np.setdiff1d(views, hold)
        self.rays, self.targets, hit = self._rays_for(scan, train_views)
        self.val = None
        if len(hold):
            self.val = self._rays_for(scan, hold)[:2]
        elif scan.validation is not None:
            self.val = self._rays_for(scan.validation, np.arange(scan.validation.n_views))[:2]
        self.target_power = float((self.targets ** 2).mean()) + 1e-12
        self.noise_variance = projection_noise_variance(proj if len(hold) == 0 else proj[train_views], hit)
        self.tv_weight = cfg.tv_weight
        """The TV weight in use: the configured one, else derived from the noise and the sampling."""
        if self.tv_weight is None:
            self.tv_weight = tv_weight_from_data(cfg.tv_strength, cfg.model_error, self.noise_variance,
                                                 self.grid.n_voxels, len(self.targets), self.target_power)
        self.target_peak = float(proj.max())
        chords = (self.rays[3] - self.rays[2])
        dt = cfg.step_voxels * float(min(self.grid.spacing_xyz))
        self.sample_step = dt
        self.n_samples = int(max(8, math.ceil(float(torch.quantile(chords[::max(1, len(chords) // 100000)], 0.98)) / dt)))
        self.state = TrainState(rays_per_batch=min(cfg.rays_start, len(self.targets)))
        self.fdk_volume = fdk_volume
        self._kernel = _pick_integrator(self.device, cfg.use_kernels)

    def _make_optimizer(self):
        lr = self.cfg.lr * (1 if self.phase == "generator" else 10)
        groups = [dict(params=self.factors.parameters(), lr=lr),
                  dict(params=self.field.parameters(), lr=self.cfg.lr * 5)]
        if self.detail is not None:
            groups.append(dict(params=self.detail.parameters(), lr=self.cfg.detail_lr * self.field.mu_scale))
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99))
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def switch_to_direct(self):
        """Refinement phase: the generated planes/lines become free parameters."""
        if self.phase == "direct":
            return
        with torch.no_grad():
            planes, lines = self.factors()
        self.factors = DirectFactors.from_tensors(planes.float(), lines.float()).to(self.device)
        self.phase = "direct"
        if self.cfg.detail_grid:
            self.detail = DetailGrid(self.grid, device=self.device)
        self._make_optimizer()

    @property
    def refine_start(self) -> int:
        if not self.cfg.use_generator or self.cfg.refine_fraction <= 0:
            return self.cfg.iterations + 1
        return int(round(self.cfg.iterations * (1.0 - self.cfg.refine_fraction)))

    # -- setup helpers --------------------------------------------------------------------------
    def _attenuation_scale(self, fdk_volume: Volume | None) -> float:
        """Typical attenuation of the object: sets the decoder's output scale (data-derived)."""
        if fdk_volume is not None:
            v = fdk_volume.array
            hi = float(np.percentile(v[v > 0], 99.5)) if np.any(v > 0) else 0.0
            if hi > 0:
                return hi
        # fall back: the largest line integral over the box's largest extent
        lo, hi = self.box if hasattr(self, "box") else self.grid.bounds()
        return float(self.scan.projections.max()) / float(np.max(hi - lo)) * 2.0

    def _rays_for(self, scan: ScanData, views):
        """All rays of the given views that cross the training box, their measurements, and the
        (len(views), rows, cols) mask of pixels whose ray crosses it."""
        v, r, c = all_pixel_indices(scan.geometry, views)
        # rays run between the outermost voxel centres, as in RTK's Joseph projector (the outer
        # half voxel of a trilinear grid is only a fade to zero)
        rays = view_rays(scan.geometry, v, r, c, *centre_bounds(self.grid), device="cpu")
        hit = rays.t_far > rays.t_near + 1e-6
        meas = torch.as_tensor(scan.projections[v, r, c], dtype=torch.float32)
        sel = torch.nonzero(hit).reshape(-1)
        packed = (rays.origins[sel].to(self.device), rays.directions[sel].to(self.device),
                  rays.t_near[sel].to(self.device), rays.t_far[sel].to(self.device))
        hit_mask = hit.numpy().reshape(len(views), *scan.geometry.det_shape)  # pixels come view-major
        return packed, meas[sel].to(self.device), hit_mask

    # -- model evaluation -----------------------------------------------------------------------
    def volume_on(self, grid: VolumeGrid) -> torch.Tensor:
        """mu on a grid (no grad): the training grid, the output grid, or any other."""
        with torch.no_grad():
            planes, lines = self.factors()
            planes, lines = planes.float(), lines.float()
            if grid.is_axis_aligned:
                vol = self.field.materialize(planes, lines, grid)
            else:
                pts = torch.as_tensor(grid.world_points(np.float32), device=self.device).reshape(-1, 3)
                vol = self.field.attenuation_at(planes, lines, pts).reshape(grid.shape_zyx)
            if self.detail is not None:
                # attenuation is never negative: the sum is clipped where the detail undercuts it
                vol = (vol + self.detail.on_grid(grid)).clamp_min(0.0)
            return vol

    def output_volume(self) -> Volume:
        return Volume(self.volume_on(self.out_grid).cpu().numpy().astype(np.float32), self.out_grid)

    def _training_volume(self) -> torch.Tensor:
        use_amp = self.cfg.amp and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            planes, lines = self.factors()
        vol = self.field.materialize(planes.float(), lines.float(), self.grid)
        if self.detail is not None:
            vol = vol + self.detail()
        return vol

    # -- phases ---------------------------------------------------------------------------------
    def fit_fdk(self):
        """Warm start: fit the generator to a smoothed, non-negative FDK volume (no projections)."""
        if self.fdk_volume is None or self.cfg.fdk_init_iterations <= 0 or self.state.iteration > 0:
            return
        from scipy.ndimage import gaussian_filter

        from ..volume_io import resample_to_grid
        target = resample_to_grid(self.fdk_volume, self.grid).array
        target = np.clip(gaussian_filter(target, 1.0), 0, None)
        target_t = torch.as_tensor(target, device=self.device)
        power = float((target_t ** 2).mean()) + 1e-12
        opt = torch.optim.Adam(list(self.factors.parameters()) + list(self.field.parameters()),
                               lr=self.cfg.lr * (1 if self.cfg.use_generator else 10) * 2)
        for _ in range(self.cfg.fdk_init_iterations):
            if self.ctx.should_stop():
                break
            vol = self._training_volume()
            loss = ((vol - target_t) ** 2).mean() / power
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def lr_factor(self, it: int) -> float:
        total = max(1, self.cfg.iterations)
        warm = max(1, int(self.cfg.warmup_fraction * total))
        if it < warm:
            return (it + 1) / warm
        p = (it - warm) / max(1, total - warm)
        f = self.cfg.final_lr_fraction
        return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    def batch_size(self, it: int) -> int:
        cfg = self.cfg
        p = min(1.0, it / max(1, cfg.curriculum_fraction * cfg.iterations))
        want = int(cfg.rays_start * (cfg.rays_end / cfg.rays_start) ** p)
        return max(64, min(want, self.state.rays_per_batch_cap, len(self.targets)))

    def step(self, it: int, n_rays: int) -> tuple[float, float]:
        """One optimisation step on n_rays random rays; returns (loss, projection PSNR of the batch)."""
        cfg = self.cfg
        bytes_needed = n_rays * self.n_samples * (8 if self._kernel is not None else 96)
        if cfg.max_batch_bytes and bytes_needed > cfg.max_batch_bytes:
            raise _BatchTooLarge(f"{n_rays} rays need ~{bytes_needed} bytes")
        gen = torch.Generator(device="cpu").manual_seed(self.ctx.seed * 1_000_003 + it)
        idx = torch.randint(0, len(self.targets), (n_rays,), generator=gen).to(self.device)
        o, d, tn, tf = (t[idx] for t in self.rays)
        meas = self.targets[idx]
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * self.lr_factor(it)
        vol = self._training_volume()
        pred = self.integrate(vol, o, d, tn, tf, jitter_seed=self.ctx.seed * 7_000_003 + it)
        data = ((pred - meas) ** 2).mean()
        loss = data / self.target_power
        if self.tv_weight > 0:
            loss = loss + self.tv_weight * _tv(vol) / self.field.mu_scale
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        psnr = 10 * math.log10(self.target_peak ** 2 / max(data.item(), 1e-20))
        return loss.item(), psnr

    def integrate(self, vol, o, d, tn, tf, jitter_seed: int = -1):
        """Line integrals of a batch; rays are grouped by chord length so each group is sampled at
        about `step_voxels`, not at the longest chord's count (short rays need fewer samples)."""
        groups = self.cfg.length_groups
        if groups <= 1 or o.shape[0] < 2 * groups:
            return self._integrate(vol, o, d, tn, tf, self.n_samples, jitter_seed)
        chord = (tf - tn).clamp_min(0.0)
        order = torch.argsort(chord)
        out = torch.empty_like(tn)
        parts = []
        for k, sel in enumerate(torch.tensor_split(order, groups)):
            n = int(max(8, math.ceil(float(chord[sel[-1]]) / self.sample_step)))
            seed = -1 if jitter_seed < 0 else jitter_seed * 16 + k
            parts.append((sel, self._integrate(vol, o[sel], d[sel], tn[sel], tf[sel], n, seed)))
        sel = torch.cat([p[0] for p in parts])
        return out.index_put((sel,), torch.cat([p[1] for p in parts]))

    def _integrate(self, vol, o, d, tn, tf, n_samples: int, jitter_seed: int):
        g = self.grid
        if self._kernel is not None:
            return self._kernel(vol, g.origin_xyz, g.spacing_xyz, o, d, tn, tf, n_samples, jitter_seed)
        return fused.grid_line_integrals_reference(vol, g.origin_xyz, g.spacing_xyz, o, d, tn, tf,
                                                   n_samples, jitter_seed)

    def validation_psnr(self) -> float | None:
        if self.val is None:
            return None
        (o, d, tn, tf), meas = self.val
        with torch.no_grad():
            vol = self._training_volume()
            preds = [self.integrate(vol, o[i:i + 65536], d[i:i + 65536], tn[i:i + 65536], tf[i:i + 65536])
                     for i in range(0, len(meas), 65536)]
            mse = float(((torch.cat(preds) - meas) ** 2).mean())
        return 10 * math.log10(max(float(meas.max()), 1e-12) ** 2 / max(mse, 1e-20))

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self):
        path = self.ctx.checkpoint_path
        if path is None:
            return
        from ..volume_io import atomic_write
        payload = dict(iteration=self.state.iteration, history=self.state.history,
                       elapsed_s=self.state.elapsed_s, rays_cap=self.state.rays_per_batch_cap,
                       phase=self.phase,
                       factors=self.factors.state_dict(), field=self.field.state_dict(),
                       detail=None if self.detail is None else self.detail.state_dict(),
                       optimizer=self.optimizer.state_dict(), config=asdict(self.cfg),
                       grid=self.grid.to_dict(), seed=self.ctx.seed)
        atomic_write(path, lambda tmp: torch.save(payload, tmp))

    def load_checkpoint(self) -> bool:
        path = self.ctx.checkpoint_path
        if path is None or not path.exists():
            return False
        ck = torch.load(path, map_location=self.device, weights_only=False)
        if ck["grid"] != self.grid.to_dict():
            raise ValueError(f"{path}: the checkpoint was made for another training grid; "
                             "resume with the same data, grid and settings, or start a new run folder")
        if ck["phase"] == "direct" and self.phase != "direct":
            self.switch_to_direct()
        self.factors.load_state_dict(ck["factors"])
        if ck.get("detail") is not None and self.detail is not None:
            self.detail.load_state_dict(ck["detail"])
        self.field.load_state_dict(ck["field"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.state.iteration = int(ck["iteration"])
        self.state.history = list(ck["history"])
        self.state.elapsed_s = float(ck["elapsed_s"])
        self.state.rays_per_batch_cap = int(ck["rays_cap"])
        return True

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Volume:
        cfg, ctx = self.cfg, self.ctx
        self.state.rays_per_batch_cap = cfg.rays_end
        resumed = ctx.resume and self.load_checkpoint()
        if not resumed:
            self.fit_fdk()
        t0 = time.perf_counter() - self.state.elapsed_s
        it = self.state.iteration
        last_loss, last_psnr = float("nan"), float("nan")
        while it < cfg.iterations and not ctx.should_stop():
            if it >= self.refine_start:
                self.switch_to_direct()
            n = self.batch_size(it)
            try:
                last_loss, last_psnr = self.step(it, n)
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not _is_oom(exc) or n <= 64:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.state.rays_per_batch_cap = max(64, n // 2)
                ctx.on_progress(iteration=it, event_note="out_of_memory_backoff",
                                rays_per_batch=self.state.rays_per_batch_cap)
                continue
            it += 1
            self.state.iteration = it
            self.state.rays_per_batch = n
            elapsed = time.perf_counter() - t0
            self.state.elapsed_s = elapsed
            if it % cfg.eval_every == 0 or it == cfg.iterations:
                val = self.validation_psnr()
                self.state.history.append((it, last_loss, last_psnr, elapsed))
                ctx.on_progress(iteration=it, iterations=cfg.iterations, loss=last_loss,
                                projection_psnr=last_psnr if val is None else val,
                                projection_psnr_kind="batch" if val is None else "held_out",
                                rays_per_batch=n, lr=self.optimizer.param_groups[0]["lr"],
                                elapsed_s=round(elapsed, 3), gpu_mem_mb=_gpu_mem_mb(self.device),
                                tv_weight=self.tv_weight)
            if cfg.snapshot_every and it % cfg.snapshot_every == 0 and it < cfg.iterations:
                ctx.on_snapshot(self.output_volume(), it)
            if cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        if self.state.history and self.state.history[-1][0] != it:
            # a last report at the exact iteration where it stopped (cancel) or ended
            self.state.history.append((it, last_loss, last_psnr, self.state.elapsed_s))
            ctx.on_progress(iteration=it, iterations=cfg.iterations, loss=last_loss,
                            projection_psnr=last_psnr, projection_psnr_kind="batch",
                            rays_per_batch=self.state.rays_per_batch, lr=self.optimizer.param_groups[0]["lr"],
                            elapsed_s=round(self.state.elapsed_s, 3), gpu_mem_mb=_gpu_mem_mb(self.device),
                            tv_weight=self.tv_weight)
        self.save_checkpoint()
        return self.output_volume()


def _tv(vol: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per voxel (mean absolute forward differences)."""
    return ((vol[1:] - vol[:-1]).abs().mean() + (vol[:, 1:] - vol[:, :-1]).abs().mean()
            + (vol[:, :, 1:] - vol[:, :, :-1]).abs().mean())


def _gpu_mem_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)


def _pick_integrator(device: torch.device, use_kernels: bool):
    """The fused grid integrator when it is built for this device, else None (PyTorch path)."""
    if not use_kernels or not fused.kernels_available(device):
        return None
    return fused.grid_line_integrals
