"""Per-scan fitting of the deep-prior VM field to the measured line integrals.

One iteration: the generator makes the planes and lines, the field is materialised on the
training grid (dense, exact at voxel centres; a coarser grid over the same box in the early
iterations, levels.py), plus the detail grid in the refinement phase, a
batch of rays is integrated through that grid (the fused kernel when built, else the PyTorch path;
rays grouped by chord length, each group at its own sample count), and the loss is the relative
MSE to the measured line integrals plus a TV prior on the grid. The ray batch grows during training
(curriculum); an out-of-memory error halves it and the step is retried.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .. import fused
from ..data import ScanData, Volume
from ..fov import pitch_at_isocentre
from ..geometry import VolumeGrid
from ..methods import RunContext
from ..render import centre_bounds
from .adam import Adam
from .config import NerfConfig
from .detail import DetailGrid
from .field import VMField
from .generator import DirectFactors, FactorGenerator
from .levels import LevelSchedule, grid_cost_ratio
from .ray_table import RayTable
from .prior_weight import NoiseLaw, fixed_pattern_note, noise_law, poisson_ray_weights, tv_weight_from_data


class _BatchTooLarge(RuntimeError):
    """Raised when a batch would exceed the configured memory budget (treated like an OOM)."""


RAY_RUN_ROW_FRACTION = 20
"""A run of rays spans at most 1/20 of a detector row (`ray_run_for`)."""


def ray_run_for(setting: int, columns: int) -> int:
    """The run length a batch is drawn in: `ray_run`, but at most a twentieth of the detector's columns.
    Runs pay where the training grid outgrows the cache, which comes with wide detectors (8 on 160
    columns, 6 on the demo's 128); on a small detector a run of 8 would be a sixth of a row, and the
    tests' 48-pixel scans then fit worse after 150 iterations (whole-box RMS error 1.12e-3 against
    0.89e-3 with independent rays; 0.92e-3 with runs of 2), while a grid that small sits in the cache."""
    return max(1, min(int(setting), int(columns) // RAY_RUN_ROW_FRACTION))


def _huber_mean(residual: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mean of Huber's penalty (r^2 within delta, 2 delta |r| - delta^2 beyond: the same value and slope at
    delta) with delta `threshold` times the batch's robust spread, 1.4826 x the median of |r| (no gradient
    through it). Why relative: at the start every residual is large and the term must be least squares."""
    size = residual.abs()
    delta = threshold * 1.4826 * float(size.detach().median()) + 1e-12
    return torch.where(size <= delta, residual ** 2, 2.0 * delta * size - delta ** 2).mean()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, _BatchTooLarge)):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def training_grid(out_grid: VolumeGrid, cfg: NerfConfig, scan: ScanData | None = None) -> VolumeGrid:
    """Axis-aligned training grid over the output grid's box, isotropic, at most max_training_voxels.

    With the scan (and `cfg.support`), the box is the object's carved support within that box
    (`carve_support`): the same grid the trainer uses, so a resume check can compare it."""
    if scan is not None:
        return carve_support(scan, out_grid, cfg)[1]
    return _grid_over(out_grid.bounds(), out_grid, cfg)


def coarser_grid(grid: VolumeGrid, factor: float) -> VolumeGrid:
    """The same box as `grid` tiled by voxels about `factor` times larger (a coarse training level)."""
    if factor <= 1.0:
        return grid
    lo, hi = (np.asarray(b, dtype=float) for b in grid.bounds())
    n = np.maximum(1, np.round(np.asarray(grid.shape_xyz) / factor))
    return VolumeGrid.centered(tuple(int(k) for k in n), tuple((hi - lo) / n), tuple((lo + hi) / 2))


def _finest_voxel(out_grid: VolumeGrid, cfg: NerfConfig) -> float:
    """The training voxel before any cap: the configured one, else the output grid's finest spacing."""
    return float(cfg.voxel_size or min(out_grid.spacing_xyz))


def _tiled(box, voxel: float) -> VolumeGrid:
    """`box` tiled by voxels of about `voxel` mm: the spacing follows from the rounded counts, so the
    voxels cover the box exactly."""
    lo, hi = (np.asarray(b, dtype=float) for b in box)
    n = np.maximum(1, np.round((hi - lo) / voxel))
    return VolumeGrid.centered(tuple(int(k) for k in n), tuple((hi - lo) / n), tuple((lo + hi) / 2))


def _grid_over(box, out_grid: VolumeGrid, cfg: NerfConfig) -> VolumeGrid:
    lo, hi = (np.asarray(b, dtype=float) for b in box)
    voxel = _finest_voxel(out_grid, cfg)
    n = np.maximum(1, np.round((hi - lo) / voxel))
    if np.prod(n) > cfg.max_training_voxels:
        voxel *= (np.prod(n) / cfg.max_training_voxels) ** (1 / 3)
    return _tiled((lo, hi), voxel)


_SUPPORT_CACHE: list = []
"""One (projections, geometry, output grid, settings, result) entry: the resume check and the trainer
carve the same support once."""


def _cached(cache: list, scan: ScanData, key):
    """What the one-entry `cache` holds for this scan (its projections and geometry, by identity) and
    `key`, or None."""
    for proj, geo, k, result in cache:
        if proj is scan.projections and geo is scan.geometry and k == key:
            return result
    return None


def _remember(cache: list, scan: ScanData, key, result):
    """`result` in the one-entry `cache` for this scan and `key` (the entry before is dropped)."""
    cache[:] = [(scan.projections, scan.geometry, key, result)]
    return result


_FINER_CACHE: list = []
"""The same for the support at the voxel it sets (`support_sets_voxel`), beside the carve it comes from:
a run whose time limit chose that voxel (`voxel_from_time_limit`) carves once."""


def _support_key(out_grid: VolumeGrid, full: VolumeGrid, cfg: NerfConfig):
    return (out_grid.to_dict(), full.to_dict(), cfg.support_margin_voxels, cfg.extend_cut_ends,
            cfg.extend_cut_sides, cfg.cut_sides_fraction, cfg.widen_reached_sides, cfg.measure_thin_sides)


_LATERAL_CACHE: list = []
"""One (projections, geometry, key, result) entry: the memory check and the trainer plan the widening
once. On a truncated scan the plan carves the support on the unwidened box to find the sides it reaches
(`measure_thin_sides`): 11 s on a 316 x 320 x 315 grid from 50 views of 320 x 320 px on 2 cores."""


def _lateral_extension(scan: ScanData, full: VolumeGrid, cfg: NerfConfig):
    """(lateral extension or None, the projections' air statistics or None): how far the training grid
    goes on past the sides of the full box where the object is wider than the field of view
    (lateral_extension.py); None when `extend_cut_sides` is off, no air threshold can be set (constant
    projections) or no column edge sees object."""
    if not cfg.extend_cut_sides:
        return None, None
    key = (full.to_dict(), cfg.support_margin_voxels, cfg.cut_sides_fraction, cfg.widen_reached_sides,
           cfg.measure_thin_sides)
    found = _cached(_LATERAL_CACHE, scan, key)
    if found is not None:
        return found
    from ..lateral_extension import plan_for_scan
    from ..support import SupportSettings, air_statistics

    settings = SupportSettings(margin_voxels=cfg.support_margin_voxels)
    stats = air_statistics(scan.projections, settings)
    threshold = stats.get("threshold")
    plan = None if threshold is None else plan_for_scan(
        scan.projections, scan.geometry, threshold, full, cfg.cut_sides_fraction,
        reached_sides=cfg.widen_reached_sides, support_settings=settings, stats=stats,
        measure_thin=cfg.measure_thin_sides)
    return _remember(_LATERAL_CACHE, scan, key, (plan, stats))


def _grid_holding(support, full: VolumeGrid) -> VolumeGrid:
    """The block of the full training grid that holds the support: the same voxels (size, cap), fewer
    of them; the mask maps onto it voxel for voxel."""
    if not support.found:
        return full
    i0, i1 = (np.asarray(b) for b in support.box_index)
    origin = np.asarray(full.origin_xyz) + i0 * np.asarray(full.spacing_xyz)
    return VolumeGrid(tuple(int(v) for v in i1 - i0 + 1), full.spacing_xyz, tuple(origin))


def _axial_extension(scan: ScanData, support, cfg: NerfConfig):
    """How far the training grid goes on past the ends where the detector cuts the object along the
    rotation axis (axial_extension.py), or None: `extend_cut_ends` off, no support carved, no row edge
    cut. `support` may be extended already: its box has the same cross-section either way."""
    if not cfg.extend_cut_ends or support is None or not support.found:
        return None
    from ..axial_extension import plan_for_scan

    return plan_for_scan(scan.projections, scan.geometry, support.threshold, *support.bounds(),
                         support.grid.spacing_xyz, support.faces_reached)


def reuse_support(scan: ScanData, out_grid: VolumeGrid, cfg: NerfConfig, support) -> bool:
    """Use a support carved before (a checkpoint's, support.py `Support.from_plain`) for this scan,
    output grid and settings instead of carving again; False (nothing changed) when it was carved on
    another grid than the one these would carve on. The checkpoint's data fingerprint, checked when it
    is restored, ties it to the same projections."""
    full = _grid_over(out_grid.bounds(), out_grid, cfg)
    if not cfg.support or support is None or not support.found:
        return False
    lateral, _ = _lateral_extension(scan, full, cfg)
    carved_on = full if lateral is None else lateral.grown(full)
    if cfg.support_sets_voxel and _finer_over(support.grid, carved_on, out_grid, cfg):
        # trained at the voxel the support set (`_finer_for_support`) over the carve's box, which the
        # axial extension may have lengthened: the checkpoint's data fingerprint ties it to this scan
        extension = None
        support.extra["voxel_from_support"] = _voxel_report(carved_on, support.grid, out_grid, cfg)
    else:
        extension = _axial_extension(scan, support, cfg) if support.grid.to_dict() != carved_on.to_dict() else None
        expected = carved_on if extension is None else extension.grown(carved_on)
        if support.grid.to_dict() != expected.to_dict():
            return False
    if lateral is not None:
        support.extra["widened"] = lateral.summary()
    if extension is not None:
        support.extra["extended"] = extension.summary()
    support.extra["reused"] = True
    finer = "voxel_from_support" in support.extra
    if not finer:
        _FINER_CACHE.clear()  # a finer support comes from this one from now on, not from an earlier carve
    _remember(_FINER_CACHE if finer else _SUPPORT_CACHE, scan, _support_key(out_grid, full, cfg),
              (support, _grid_holding(support, support.grid)))
    return True


def _finer_over(grid: VolumeGrid, carved_on: VolumeGrid, out_grid: VolumeGrid, cfg: NerfConfig) -> bool:
    """`grid` (a checkpoint's support grid) covers the box carving uses (or that box lengthened past its
    ends) at a finer voxel, not finer than the output's: the support set the voxel there."""
    if not (grid.is_axis_aligned and carved_on.is_axis_aligned):
        return False
    voxel = float(min(grid.spacing_xyz))
    if not (0.999 * _finest_voxel(out_grid, cfg) <= voxel < 0.95 * float(min(carved_on.spacing_xyz))):
        return False
    (lo, hi), (clo, chi) = grid.bounds(), carved_on.bounds()
    tol = 1e-3 * voxel
    return bool(np.all(lo <= clo + tol) and np.all(hi >= chi - tol))


def _voxel_report(carved_on: VolumeGrid, trained_on: VolumeGrid, out_grid: VolumeGrid, cfg: NerfConfig) -> dict:
    """run.json's `support.voxel_from_support`: the voxel carving used, the one the support set, the output's."""
    return {"carved_mm": round(float(min(carved_on.spacing_xyz)), 4),
            "training_mm": round(float(min(trained_on.spacing_xyz)), 4),
            "output_mm": round(_finest_voxel(out_grid, cfg), 4)}


def carve_support(scan: ScanData, out_grid: VolumeGrid, cfg: NerfConfig):
    """(Support or None, training grid): the object's support carved on the training grid over the
    output grid's box (support.py), widened past its sides where the object is wider than the field of
    view (lateral_extension.py), and the training grid over the support's bounding box, lengthened past
    the ends the detector cuts (axial_extension.py).

    The support is None when `cfg.support` is off (the grid is then the full box: what that setting
    asks for); a Support without a mask (its `reason` says why) when the data show no clear air, and
    then the grid is the full box, widened where the column edges see object."""
    full = _grid_over(out_grid.bounds(), out_grid, cfg)
    if not cfg.support:
        return None, full
    key = _support_key(out_grid, full, cfg)
    finer = _cached(_FINER_CACHE, scan, key) if cfg.support_sets_voxel else None
    if finer is not None:
        return finer
    found = _cached(_SUPPORT_CACHE, scan, key) or _carve(scan, out_grid, full, cfg, key)
    if not cfg.support_sets_voxel:
        return found
    t0 = time.perf_counter()
    support = _finer_for_support(found[0], out_grid, cfg)
    if support is not found[0]:
        support.extra["seconds"] = round(found[0].extra.get("seconds", 0.0) + time.perf_counter() - t0, 3)
    return _remember(_FINER_CACHE, scan, key, (support, _grid_holding(support, support.grid)))


def _carve(scan: ScanData, out_grid: VolumeGrid, full: VolumeGrid, cfg: NerfConfig, key):
    """`carve_support`'s carve at the voxel the cap on the field of view's box allows, remembered under
    `key`."""
    from ..support import SupportSettings, object_support

    t0 = time.perf_counter()
    lateral, stats = _lateral_extension(scan, full, cfg)
    if lateral is not None:
        full = lateral.grown(full)

    support = object_support(scan.projections, scan.geometry, full,
                             SupportSettings(margin_voxels=cfg.support_margin_voxels), stats=stats)
    if lateral is not None:
        support.extra["widened"] = lateral.summary()
    extension = _axial_extension(scan, support, cfg)
    if extension is not None:
        support = support.extended(extension)
    support.extra["seconds"] = round(time.perf_counter() - t0, 3)
    result = (support, _grid_holding(support, support.grid))
    return _remember(_SUPPORT_CACHE, scan, key, result)


def _support_voxel(support, out_grid: VolumeGrid, cfg: NerfConfig) -> float | None:
    """The voxel the support sets (`support_sets_voxel`), before the counts round: the finest (never finer
    than the output's) at which the support's box holds at most `max_training_voxels`; None when carving
    found nothing, or the cap did not coarsen the carve's voxel (this one not 5 % finer)."""
    if support is None or not support.found or not support.grid.is_axis_aligned:
        return None
    lo, hi = support.bounds()
    voxel = max(_finest_voxel(out_grid, cfg), float(np.prod(hi - lo) / cfg.max_training_voxels) ** (1 / 3))
    return voxel if voxel < 0.95 * float(min(support.grid.spacing_xyz)) else None


def _finer_for_support(support, out_grid: VolumeGrid, cfg: NerfConfig):
    """`support_sets_voxel`: the support on its grid's box at the finest voxel (never finer than the
    output's) whose training grid, the support's box, holds at most `max_training_voxels`; `support`
    itself when carving found nothing or the cap did not coarsen the voxel. The mask is the coarse one
    at the finer voxels' centres (nearest voxel): its margin of `support_margin_voxels` coarse voxels
    stays as wide in mm, and nothing is carved twice."""
    from ..support import Support, bounding_box

    voxel = _support_voxel(support, out_grid, cfg)
    if voxel is None:
        return support
    coarse = float(min(support.grid.spacing_xyz))
    for _ in range(3):  # the counts round: a few percent finer or coarser than asked
        if voxel >= 0.95 * coarse:
            return support
        grid = _tiled(support.grid.bounds(), voxel)
        mask = support.mask_on(grid)
        box = bounding_box(mask)
        n = np.asarray(box[1]) - np.asarray(box[0]) + 1
        if np.prod(n) <= cfg.max_training_voxels:
            break
        voxel *= float(np.prod(n) / cfg.max_training_voxels) ** (1 / 3) * 1.001
    else:
        return support
    return Support(grid, mask, box_index=box, air_level=support.air_level, threshold=support.threshold,
                   noise_sigma=support.noise_sigma, air_pixel_fraction=support.air_pixel_fraction,
                   extra=dict(support.extra, voxel_from_support=_voxel_report(support.grid, grid, out_grid, cfg)))


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
                 fdk_volume: Volume | None = None, choose_voxel: bool = False):
        self.scan, self.out_grid, self.cfg, self.ctx = scan, out_grid, cfg, ctx
        self.device = torch.device(ctx.device)
        self.created_at = time.perf_counter()
        self.choose_voxel = choose_voxel
        """Whether the run chooses its training voxel once it has measured its rate
        (`voxel_from_time_limit`): it then trains at the voxel the cap on the field of view allows and may
        hand over to a run at the voxel the support sets (`voxel_switch`)."""
        self.voxel_switch: NerfConfig | None = None
        """Set when `run` stopped early (`_voxel_from_time`) because the time limit buys enough iterations
        at the voxel the support sets: the configuration to run instead (nerf/method.py builds it)."""
        self._held_messages: list[str] | None = [] if choose_voxel else None
        """What the set-up found, held until the voxel is chosen: said if this run goes on, dropped if the
        run at the other voxel, which says its own, replaces it."""
        torch.manual_seed(ctx.seed)
        self.support, self.grid = carve_support(scan, out_grid, cfg)
        """The object's support (support.py; None when off) and the training grid over its box."""
        self._support_mask = None
        """(z, y, x) float mask of the support on the training grid, or None (no support)."""
        self._mask_cache: dict = {}
        if self.support is not None and self.support.found:
            self._support_mask = torch.as_tensor(self.support.mask_on(self.grid), dtype=torch.float32,
                                                 device=self.device)
        self._report_support(out_grid)
        box_min, box_max = self.grid.bounds()
        self.box = (box_min, box_max)
        proj = scan.projections
        mu_scale = self._attenuation_scale(fdk_volume)
        res = cfg.plane_resolution or max(self.grid.shape_xyz)
        self.field = VMField(cfg.channels, box_min, box_max, mu_scale).to(self.device)
        if cfg.use_generator:
            self.factors = FactorGenerator(cfg.channels, res, cfg.generator_width, cfg.noise_channels,
                                           seed=ctx.seed, init_scale=cfg.generator_init_scale,
                                           plane_init_fraction=cfg.generator_plane_init_fraction).to(self.device)
            self.phase = "generator"
        else:
            self.factors = DirectFactors(cfg.channels, res, seed=ctx.seed).to(self.device)
            self.phase = "direct"
        self.detail: DetailGrid | None = None
        """Dense detail added to the field in the direct (refinement) phase; see detail.py."""
        self._frozen_field: torch.Tensor | None = None
        """The field's volume on the training grid once it is frozen (`freeze_field`), else None."""
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
        self.n_train_views = len(train_views)
        self.ray_table = self._rays_for(scan, train_views)
        """The training rays and their measurements (ray_table.py: kept, or computed per batch on a large scan)."""
        self.targets = self.ray_table.targets
        hit = self.ray_table.hit_mask
        self.ray_run = ray_run_for(cfg.ray_run, scan.geometry.det_shape[1])
        self.val = None
        if len(hold):
            self.val = self._rays_for(scan, hold)
        elif scan.validation is not None:
            self.val = self._rays_for(scan.validation, np.arange(scan.validation.n_views))
        self.target_power = float((self.targets ** 2).mean()) + 1e-12
        measured = None if scan.defects is None else ~(scan.defects if len(hold) == 0 else scan.defects[train_views])
        noise = noise_law(proj if len(hold) == 0 else proj[train_views], hit, measured=measured)
        self.noise_variance = noise.mean_variance
        self.air_noise_variance = noise.air_variance
        """The line integrals' noise variance in the air (about 1 / the photons per unattenuated ray), or None."""
        self.ray_weights = self._ray_weights(noise)
        """Per-ray weights of the data term (None: least squares, every ray alike)."""
        self._report_fixed_pattern(noise)
        truncation = self._truncation(scan)
        plain_because, edge_despite = (None, truncation) if cfg.tv_edge_when_truncated else (truncation, None)
        self._plain_tv_because = plain_because
        """Why the TV is plain despite `tv_edge` (the object goes on beyond the detector and
        `tv_edge_when_truncated` is off), or None."""
        # the edge scale kept on a truncated scan counts the voxels past the sides too (`_voxels_for_weight`)
        inside = self._voxels_for_weight(out_grid, past_sides=False)
        counted = self._voxels_for_weight(out_grid, past_sides=True) if edge_despite else inside
        self.tv_weight = cfg.tv_weight
        """The TV weight in use: the configured one, else derived from the noise and the sampling."""
        if self.tv_weight is None:
            self.tv_weight = tv_weight_from_data(cfg.tv_strength, cfg.model_error, self.noise_variance,
                                                 counted, len(self.targets), self.target_power)
        # the training voxel h and the rays' spacing d at the isocentre, for reading the weight: the best
        # weight's dependence on h / d was swept in docs/nerf.md ("The TV weight on a finer grid, swept")
        voxel_mm = float(np.prod(self.grid.spacing_xyz) ** (1.0 / 3.0))
        ray_spacing_mm = pitch_at_isocentre(scan.geometry)
        self.ctx.report["tv_prior"] = {"weight": self.tv_weight,
                                       "weight_from": "data" if cfg.tv_weight is None else "setting",
                                       "voxels_counted": counted, "voxels_past_sides_counted": counted - inside,
                                       "edge": cfg.tv_edge, "edge_attenuation": self.tv_edge(),
                                       "plain_because": plain_because, "edge_despite": edge_despite,
                                       "voxel_mm": round(voxel_mm, 4), "ray_spacing_mm": round(ray_spacing_mm, 4)}
        if edge_despite:
            share = f"; its weight counts the {counted - inside} training voxels past the sides too" \
                if counted > inside and cfg.tv_weight is None else ""
            self._say(f"edge-scaled TV on truncated projections ({edge_despite}){share}; "
                      "`--setting tv_edge_when_truncated=false` gives plain TV, which holds down "
                      "a bright rim at a cut the training grid does not go past (docs/nerf.md)")
        elif plain_because:
            self._say(f"plain TV: {plain_because} (tv_edge_when_truncated=false)")
        self.target_peak = float(proj.max())
        self._chord_98 = float(torch.quantile(self.ray_table.chords(100_000).float().cpu(), 0.98))
        self.levels = LevelSchedule(tuple(cfg.coarse_levels) if cfg.use_generator else (), cfg.coarse_fraction,
                                    end_limit=1.0 - cfg.refine_fraction if cfg.use_generator else 0.0)
        """The coarse-to-fine schedule (levels.py); only in the generator phase."""
        self.level = -1
        self.level_grid = self.grid
        """The grid the field is trained on now: `self.grid` or a coarser one over its box."""
        self._set_level(self.levels.level_at(0, self.iterations))
        self.state = TrainState(rays_per_batch=min(cfg.rays_start, len(self.targets)))
        self.fdk_volume = fdk_volume
        self._kernel = _pick_integrator(self.device, cfg.use_kernels)

    def _voxels_for_weight(self, out_grid: VolumeGrid, past_sides: bool) -> int:
        """Training voxels the data-derived TV weight counts: those within the output grid's box, and with
        `past_sides` also those past its sides where the grid is widened (`extend_cut_sides`).

        The slabs past the cut ends (`extend_cut_ends`) only hold what some rows see of the material
        there; counted, they would raise the weight of the whole volume by their share (24 % on the
        25-view abdomen cut to 120 rows). Past the sides it depends on the prior: plain TV, the default on
        a truncated scan, is best at the inside count; the edge-scaled TV kept there
        (`tv_edge_when_truncated`) wants the widened count: at 1200 iterations on the abdomen cut to 90
        columns (2.75 times the voxels in-plane) 34.53 dB at the inside count, 35.69 at the widened one,
        plain TV 35.40 (docs/nerf.md, "A table wider than the field of view")."""
        from ..lateral_extension import inner_voxel_count

        lo, hi = (np.array(b, dtype=float) for b in _grid_over(out_grid.bounds(), out_grid, self.cfg).bounds())
        if past_sides and self.support is not None:
            for axis in (self.support.extra.get("widened") or {}).get("axes", ""):
                lo["xyz".index(axis)], hi["xyz".index(axis)] = -np.inf, np.inf
        return inner_voxel_count(self.grid, lo, hi)

    def _ray_weights(self, noise: NoiseLaw):
        """PWLS weights of the training rays, or None (least squares: asked for, or no air in the views to
        fix the noise law); what was used goes into run.json."""
        mode = self.cfg.ray_weighting
        if mode == "uniform" or noise.air_variance is None:
            why = ("asked for (ray_weighting uniform)" if mode == "uniform"
                   else "no air in the views to measure the noise law")
            self.ctx.report["data_term"] = {"weighting": "uniform", "reason": why}
            return None
        weights = poisson_ray_weights(self.targets, noise.air_variance, self.cfg.model_error, self.target_power,
                                      mean_one=mode == "poisson-mean1",
                                      fixed_variance=noise.fixed_pattern_variance or 0.0)
        self.ctx.report["data_term"] = {"weighting": mode, "air_noise_variance": noise.air_variance,
                                        "weights_min": float(weights.min()), "weights_max": float(weights.max()),
                                        "weights_mean": float(weights.mean())}
        return weights

    def _report_fixed_pattern(self, noise: NoiseLaw):
        """Put the air's fixed pattern (prior_weight.between_view_variance) into run.json, and say so where it
        is larger than the photon noise: rings are then likely, and the cure is a new flat field."""
        if noise.fixed_pattern_variance is None or noise.air_variance is None:
            return
        self.ctx.report["data_term"]["fixed_pattern_rms"] = math.sqrt(noise.fixed_pattern_variance)
        note = fixed_pattern_note(noise)
        if note is not None:
            self._say(note)

    def _say(self, text: str):
        """A set-up line for the user (held while the voxel is still to be chosen)."""
        if self._held_messages is None:
            self.ctx.on_message(text)
        else:
            self._held_messages.append(text)

    def _release_messages(self, say: bool = True):
        """Says the held set-up lines (or drops them: `say` False) and stops holding."""
        held, self._held_messages = self._held_messages or [], None
        for text in held if say else ():
            self.ctx.on_message(text)

    FINER_VOXEL_MIN_ITERATIONS = 800
    """At 25 views: below about this many iterations the finer voxel of `support_sets_voxel` scores lower
    than the coarser one would in the same time (the abdomen: 397 iterations at 60 s gave 35.02 dB against
    36.31 for 802 coarser ones; about 950 at 180 s gave 36.80-36.89 against 36.71). It scales with the
    views (`_finer_voxel_iterations`; docs/nerf.md)."""

    FINER_VOXEL_CHOSEN_FROM = 1000
    """At 25 views: `voxel_from_time_limit` trains at the support's voxel when the time limit buys at least
    this many iterations there (predicted from the rate measured early): a margin over the break-even
    above, and near where the abdomen reaches its end point at 2.13 mm (1200 iterations). It scales with
    the views (`_finer_voxel_iterations`)."""

    FINER_VOXEL_VIEWS = 25
    """The views at which the two counts above were measured."""

    FINER_VOXEL_PHOTONS = 9e4
    """The photons per unattenuated ray at which they were measured: the benchmark cases' I0 of 1e5, less
    a tenth for the spread of its estimate from the air's noise (9.8e4-1e5 on those cases)."""

    def _photons_per_ray(self) -> float | None:
        """The photons per unattenuated ray the air's noise gives (1 / its variance), or None without air."""
        return 1.0 / self.air_noise_variance if self.air_noise_variance else None

    def _finer_voxel_views(self) -> float:
        """The training views, counted down where the air's noise says fewer photons per ray than
        FINER_VOXEL_PHOTONS (never up): a noisier view says less about the detail only the finer voxel
        holds. At 50 views and ten times the photon noise (I0 1e4) the finer voxel lost 0.22 dB after 681
        iterations (120 s), where at I0 1e5 it gained 0.26 after 501."""
        photons = self._photons_per_ray()
        views = float(max(1, self.n_train_views))
        return views * min(1.0, photons / self.FINER_VOXEL_PHOTONS) if photons else views

    def _finer_voxel_iterations(self, at_25_views: int) -> int:
        """A count measured at 25 views (above) for this scan's training views: the break-even falls as the
        views grow, since more views resolve detail that only the finer voxel holds. Against the coarser voxel
        in the same time on the abdomen, the finer one lost 0.19 dB after 962 iterations at 10 views and
        gained 0.16 after about 1000 at 25 (180 s); at 50 views it lost 1.46 dB after 266 (60 s) and gained
        0.26 after 501 (90 s) and 0.73 after 905 (180 s); at 100 views it gained 0.58 after 664 (120 s). The
        break-even is about inverse to the views up to 50 (counted down for photon noise: `_finer_voxel_views`);
        the count never goes below its value at 50 views, since at 100 views the finer voxel still lost 1.52 dB
        after 336 iterations (60 s) and was level after 463 (90 s): the break-even stops falling past 50."""
        views = max(1e-3, self._finer_voxel_views())
        return max(at_25_views // 2, int(round(at_25_views * self.FINER_VOXEL_VIEWS / views)))

    def _finer_voxel_scan(self) -> str:
        """The views (and the photons, where they count the views down) in the lines about the finer voxel."""
        photons = self._photons_per_ray()
        fewer = photons is not None and photons < self.FINER_VOXEL_PHOTONS
        return f"{self.n_train_views} views" + (f" of about {photons:.2g} photons per ray" if fewer else "")

    FINER_VOXEL_COST_FACTOR = 1.15
    """The cost model's ratio of a finer grid's iteration to a coarser one's (levels.grid_cost_ratio)
    times this is what the runs measured: on the 25-view abdomen 2.76 -> 2.13 mm the model says 1.63,
    the iterations done in the same time 1.84-2.0 (the refinement phase's detail grid and its optimiser
    outgrow the cache)."""

    VOXEL_RATE_ITERATIONS = 12
    """A run that chooses its voxel does so once it has measured its rate over this many iterations after
    the time budget measured the export (which the interval it falls in would count as training): the
    first plan, from one interval, misjudged the rate by up to a factor 2 (25-view abdomen at 180 s: first
    plans of 1280 and 2419 iterations in two runs that did 2063 and 2032), and the rate counting the
    export's interval by 40 % 12 iterations later; without it, within 10 % of the whole run's. 12 coarse
    iterations take under a second there."""

    def _voxel_from_time(self, budget: "TimeBudget") -> NerfConfig | None:
        """Once the rate is measured (`VOXEL_RATE_ITERATIONS`) in a run that chooses its voxel
        (`choose_voxel`): the configuration of a run at the voxel the support sets when that rate buys at least
        `FINER_VOXEL_CHOSEN_FROM` iterations there in the time left (less this run's set-up, which the
        next run repeats), else None (this run goes on). What was weighed goes into run.json
        (`method_report.voxel_from_time_limit`) and one line."""
        fine = _support_voxel(self.support, self.out_grid, self.cfg)
        rate = budget.seconds_per_unit_since(budget.export_measured_at)
        if fine is None or rate is None:
            return None  # nothing carved, or the cap on the field of view did not coarsen the voxel
        coarse = float(min(self.grid.spacing_xyz))
        shape = _tiled(self.support.bounds(), fine).shape_xyz  # the support's box at that voxel (no mask needed)
        ratio = self.FINER_VOXEL_COST_FACTOR * grid_cost_ratio(
            self.grid.shape_xyz, coarse, shape, fine, self.cfg.integrator, self.cfg.plane_resolution)
        left = budget.remaining() - (self._loop_start - self.created_at)
        planned, here_plan = (budget.plan_from(0, left, rate, factor) for factor in (ratio, 1.0))
        needed = self._finer_voxel_iterations(self.FINER_VOXEL_CHOSEN_FROM)
        finer = planned >= needed
        self.ctx.report["voxel_from_time_limit"] = {
            "chosen_mm": round(fine if finer else coarse, 4), "support_voxel_mm": round(fine, 4),
            "field_of_view_voxel_mm": round(coarse, 4), "iterations_there": planned,
            "iterations_needed": needed, "views": self.n_train_views,
            "views_counted": round(self._finer_voxel_views(), 2), "cost_ratio": round(ratio, 3),
            "iterations_here": here_plan}
        here = (f"the time limit buys about {planned} iterations at the support's voxel, about {fine:.3g} mm "
                f"({here_plan} at {coarse:.3g} mm)")
        self._release_messages(say=not finer)
        if finer:
            self.ctx.on_message(f"{here}: training there")
            return replace(self.cfg, support_sets_voxel=True)
        self.ctx.on_message(f"{here}: staying at {coarse:.3g} mm; it pays from about {needed} at "
                            f"{self._finer_voxel_scan()} (`--setting voxel_from_time_limit=false` keeps the "
                            "preset's voxel)")
        return None

    def _finer_voxel_too_short(self, planned: int) -> str | None:
        """What to tell a timed run whose support set a finer voxel than the cap on the field of view
        allowed, when the time buys too few iterations for it to pay; None otherwise."""
        finer = None if self.support is None else self.support.extra.get("voxel_from_support")
        least = self._finer_voxel_iterations(self.FINER_VOXEL_MIN_ITERATIONS)
        if not finer or planned >= least:
            return None
        return (f"the time limit buys {planned} iterations at the support's {finer['training_mm']:.3g} mm voxel "
                f"(support_sets_voxel); under about {least} at {self._finer_voxel_scan()} the "
                f"{finer['carved_mm']:.3g} mm voxel scores higher in the same time: give more time, or "
                "`--setting support_sets_voxel=false` (docs/nerf.md, \"The support sets the voxel\")")

    def _report_support(self, out_grid: VolumeGrid):
        """Into ctx.report (run.json) and one line for the user: what carving found, or why nothing."""
        if self.support is None:
            self.ctx.report["support"] = {"found": False, "reason": "turned off (support=False)",
                                          "training_grid_shape_xyz": list(self.grid.shape_xyz),
                                          "training_voxels": self.grid.n_voxels}
            return
        info = dict(self.support.summary(), training_grid_shape_xyz=list(self.grid.shape_xyz),
                    training_voxels=self.grid.n_voxels)
        self.ctx.report["support"] = info
        if self.support.found:
            full = self.support.grid
            self._say(
                f"object support carved from the projections: box {self.grid.shape_xyz} of {full.shape_xyz} voxels "
                f"({100 * self.grid.n_voxels / full.n_voxels:.0f} % of them), the support itself "
                f"{100 * self.support.fraction:.0f} %; the volume is zero outside it")
            finer = self.support.extra.get("voxel_from_support")
            if finer:
                self._say(
                    f"the support sets the training voxel: {finer['training_mm']:.3g} mm over its box, where the "
                    f"field of view's box needed {finer['carved_mm']:.3g} mm to stay within "
                    f"{self.cfg.max_training_voxels} voxels (support_sets_voxel)")
            extended = self.support.extra.get("extended")
            if extended:
                self._say(
                    f"the object goes on past the detector's {', '.join(extended['edges'])} edge(s): training "
                    f"{' and '.join(f'{mm:g}' for mm in extended['mm'])} mm past the box's ends along "
                    f"{extended['axis']} (the output grid is unchanged)")
            from ..support import faces_warning
            trained_past = self._faces_trained_past()
            faces = self.support.faces_reached
            for group, past in (([f for f in faces if f not in trained_past], False),
                                ([f for f in faces if f in trained_past], True)):
                warning = faces_warning(group, out_grid, trained_past=past)
                if warning:
                    self._say("warning: " + warning)
        else:
            self._say(f"no object support carved: {self.support.reason}")
        widened = self.support.extra.get("widened")
        if widened:
            from ..lateral_extension import describe_faces

            self._say(
                f"the object is wider than the field of view (the detector's {', '.join(widened['edges'])} "
                f"edge(s) see it): training {describe_faces(widened)} (the output grid is unchanged)")

    def _faces_trained_past(self) -> set[str]:
        """The grid faces ("x-", ...) the training grid goes on past: the in-plane ones where it was
        widened (lateral_extension.py), the ends along the axis that were extended (axial_extension.py)."""
        extra = self.support.extra if self.support is not None else {}
        faces = set()
        if extra.get("widened"):
            faces |= set(extra["widened"]["faces"])
        if extra.get("extended"):
            ext = extra["extended"]
            faces |= {ext["axis"] + sign for sign, n in zip("-+", ext["voxels"]) if n > 0}
        return faces

    def support_mask_on(self, grid: VolumeGrid, dilate: int = 0) -> torch.Tensor | None:
        """The support as a float mask on any grid (cached), or None when there is none; `dilate`
        grows it by that many of the grid's voxels (a coarse level's voxel must not cut the object)."""
        if self._support_mask is None:
            return None
        if not dilate and (grid is self.grid or grid.to_dict() == self.grid.to_dict()):
            return self._support_mask
        key = repr((grid.to_dict(), dilate))
        if key not in self._mask_cache:
            mask = self.support.mask_on(grid)
            if dilate:
                from scipy.ndimage import binary_dilation
                mask = binary_dilation(mask, iterations=int(dilate))
            while len(self._mask_cache) >= 2:  # the coarse level's and the output grid's; exports vary
                self._mask_cache.pop(next(iter(self._mask_cache)))
            self._mask_cache[key] = torch.as_tensor(mask, dtype=torch.float32, device=self.device)
        return self._mask_cache[key]

    # -- coarse-to-fine -------------------------------------------------------------------------
    def _set_level(self, level: int):
        """Train on the grid of `level` (levels.py) from now on; the sample spacing follows its voxel."""
        if level == self.level:
            return
        self.level = level
        self.level_grid = coarser_grid(self.grid, self.levels.factor(level))
        dt = self.cfg.step_voxels * float(min(self.level_grid.spacing_xyz))
        self.sample_step = dt
        self.n_samples = int(max(8, math.ceil(self._chord_98 / dt)))

    def _update_level(self, it: int):
        """The level of iteration `it` under the current plan; never back to a coarser one (a longer
        plan moves the boundaries later, but a field once trained finer stays finer)."""
        self._set_level(max(self.level, self.levels.level_at(it, self.iterations)))

    def iteration_cost(self, iterations: np.ndarray, planned: int) -> np.ndarray:
        """Relative cost of iterations under a plan of `planned` (1 = a full-grid iteration at the
        largest batch): the level's grid and the ray batch (TimeBudget plans with it)."""
        it = np.asarray(iterations, dtype=float)
        cfg = self.cfg
        p = np.minimum(1.0, it / max(1.0, cfg.curriculum_fraction * planned))
        batch = np.clip(cfg.rays_start * (cfg.rays_end / cfg.rays_start) ** p, 64,
                        min(self.state.rays_per_batch_cap, len(self.targets)))
        rays = batch / max(1.0, float(min(cfg.rays_end, len(self.targets))))
        factor = np.ones_like(it)
        for k, end in reversed(list(enumerate(self.levels.boundaries(planned)))):
            factor[it < end] = self.levels.factor(k)
        generator = cfg.use_generator & (it < self._refine_start_of(planned))
        frozen = it >= self._freeze_start_of(planned)
        return LevelSchedule.relative_cost(factor, rays, generator, cfg.integrator, frozen)

    def _make_optimizer(self):
        lr = self.cfg.lr * (1 if self.phase == "generator" else 10)
        groups = [dict(params=self.factors.parameters(), lr=lr),
                  dict(params=self.field.parameters(), lr=self.cfg.lr * 5)]
        if self.detail is not None:
            groups.append(dict(params=self.detail.parameters(), lr=self.cfg.detail_lr * self.field.mu_scale))
        self.optimizer = Adam(groups, betas=(0.9, 0.99))
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def switch_to_direct(self):
        """Refinement phase: the generated planes/lines become free parameters (on the full grid)."""
        if self.phase == "direct":
            return
        self._set_level(len(self.levels.factors))
        with torch.no_grad():
            planes, lines = self.factors()
        self.factors = DirectFactors.from_tensors(planes.float(), lines.float()).to(self.device)
        self.phase = "direct"
        if self.cfg.detail_grid:
            self.detail = DetailGrid(self.grid, device=self.device)
        self._make_optimizer()

    def freeze_field(self):
        """From here on only the detail grid learns: the VM field's volume on the training grid is
        computed once and kept, its factors and decoder stop taking gradients (the optimiser skips a
        parameter without one). Called again after a resume, it recomputes the same volume from the
        restored factors."""
        if self._frozen_field is not None or self.phase != "direct":
            return
        if self.level_grid is not self.grid:
            raise RuntimeError("the field freezes on the full training grid only")
        with torch.no_grad():
            planes, lines = self.factors()
            self._frozen_field = self.field.materialize(planes.float(), lines.float(), self.grid)
        for p in [*self.factors.parameters(), *self.field.parameters()]:
            p.requires_grad_(False)
            p.grad = None

    def _freeze_start_of(self, planned: int) -> int:
        """The iteration where the field freezes under a plan of `planned` iterations: the last
        `freeze_field_fraction` of the plan, never before the refinement phase (planned + 1: never)."""
        f = self.cfg.freeze_field_fraction
        if f <= 0 or not self.cfg.detail_grid:
            return planned + 1
        refine = self._refine_start_of(planned) if self.cfg.use_generator else 0
        if refine > planned:
            return planned + 1
        return max(refine, int(round(planned * (1.0 - f))))

    @property
    def iterations(self) -> int:
        """The planned iteration count: the configured one, or the time budget's current plan."""
        return getattr(self, "_planned_iterations", None) or self.cfg.iterations

    @property
    def refine_start(self) -> int:
        return self._refine_start_of(self.iterations)

    def _refine_start_of(self, planned: int) -> int:
        """The iteration where the refinement phase starts under a plan of `planned` iterations."""
        if not self.cfg.use_generator or self.cfg.refine_fraction <= 0:
            return planned + 1
        return int(round(planned * (1.0 - self.cfg.refine_fraction)))

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

    def _rays_for(self, scan: ScanData, views) -> RayTable:
        """All rays of the given views that cross the training box and were measured (not `scan.defects`), with
        their measurements and the (len(views), rows, cols) mask of those pixels (ray_table.py)."""
        # rays run between the outermost voxel centres, as in RTK's Joseph projector (the outer
        # half voxel of a trilinear grid is only a fade to zero)
        return RayTable(scan.geometry, views, *centre_bounds(self.grid), scan.projections, scan.defects,
                        device=self.device, stored_bytes=self.cfg.stored_rays_bytes)

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
            mask = self.support_mask_on(grid)
            if mask is not None:
                vol = vol * mask
            return vol

    def output_volume(self) -> Volume:
        return Volume(self.volume_on(self.out_grid).cpu().numpy().astype(np.float32), self.out_grid)

    def _training_volume(self) -> torch.Tensor:
        """The field on the current level's grid (differentiable), zero outside the support."""
        grid = self.level_grid
        if self._frozen_field is not None:
            vol = self._frozen_field  # computed once (freeze_field); no gradient flows into the field
        else:
            use_amp = self.cfg.amp and self.device.type == "cuda"
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                planes, lines = self.factors()
            vol = self.field.materialize(planes.float(), lines.float(), grid)
        if self.detail is not None:
            if grid is not self.grid:
                raise RuntimeError("the detail grid lives on the full training grid only")
            vol = vol + self.detail()
        mask = self.support_mask_on(grid, dilate=0 if grid is self.grid else 1)
        if mask is not None:
            vol = vol * mask  # zero outside the object's support: no gradient, no TV there
        return vol

    # -- phases ---------------------------------------------------------------------------------
    def fit_fdk(self):
        """Warm start: fit the generator to a smoothed, non-negative FDK volume (no projections)."""
        if self.fdk_volume is None or self.cfg.fdk_init_iterations <= 0 or self.state.iteration > 0:
            return
        from scipy.ndimage import gaussian_filter

        from ..volume_io import resample_to_grid
        target = resample_to_grid(self.fdk_volume, self.level_grid).array  # the grid it trains on now
        target = np.clip(gaussian_filter(target, 1.0), 0, None)
        target_t = torch.as_tensor(target, device=self.device)
        power = float((target_t ** 2).mean()) + 1e-12
        opt = Adam(list(self.factors.parameters()) + list(self.field.parameters()),
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
        total = max(1, self.iterations)
        warm = max(1, int(self.cfg.warmup_fraction * total))
        if it < warm:
            return (it + 1) / warm
        p = (it - warm) / max(1, total - warm)
        f = self.cfg.final_lr_fraction
        return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    def batch_size(self, it: int) -> int:
        cfg = self.cfg
        p = min(1.0, it / max(1, cfg.curriculum_fraction * self.iterations))
        want = int(cfg.rays_start * (cfg.rays_end / cfg.rays_start) ** p)
        return max(64, min(want, self.state.rays_per_batch_cap, len(self.targets)))

    def step(self, it: int, n_rays: int) -> tuple[float, float]:
        """One optimisation step on n_rays rays drawn in runs (`_draw_rays`); returns (loss, projection PSNR of
        the batch)."""
        cfg = self.cfg
        bytes_needed = n_rays * self.n_samples * (8 if self._kernel is not None else 96)
        if cfg.max_batch_bytes and bytes_needed > cfg.max_batch_bytes:
            raise _BatchTooLarge(f"{n_rays} rays need ~{bytes_needed} bytes")
        gen = torch.Generator(device="cpu").manual_seed(self.ctx.seed * 1_000_003 + it)
        idx = self._draw_rays(n_rays, gen)
        # in storage order (view, row, column) neighbouring rays read neighbouring voxels: Joseph's
        # integrals of a sorted batch took 83 instead of 112-126 ms (25-view abdomen, 2 cores); the
        # loss is a mean, so the order changes nothing else
        idx = torch.sort(idx).values.to(self.device)
        o, d, tn, tf = self.ray_table.rays(idx)
        meas = self.targets[idx]
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * self.lr_factor(it)
        vol = self._training_volume()
        pred = self.integrate(vol, o, d, tn, tf, jitter_seed=self.ctx.seed * 7_000_003 + it)
        residual = pred - meas if self.ray_weights is None else (pred - meas) * self.ray_weights[idx].sqrt()
        data = _huber_mean(residual, cfg.robust_data) if cfg.robust_data > 0 else (residual ** 2).mean()
        loss = data / self.target_power
        if self.tv_weight > 0:
            tv = _tv(vol, self.tv_edge(), fused_kernel=self._kernel is not None)
            loss = loss + self.tv_weight * tv / self.field.mu_scale
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        plain = self.ray_weights is None and cfg.robust_data <= 0
        mse = data.item() if plain else float(((pred.detach() - meas) ** 2).mean())
        psnr = 10 * math.log10(self.target_peak ** 2 / max(mse, 1e-20))
        return loss.item(), psnr

    def _draw_rays(self, n_rays: int, gen: torch.Generator) -> torch.Tensor:
        """Indices of a batch's rays: runs of `self.ray_run` consecutive rays in their view-major storage order
        (the next pixels of a detector row that cross the box, or of the next row at its end) from
        uniformly random starts, wrapping at the end so every ray is equally likely; independent draws
        when `ray_run` is 1."""
        total, run = len(self.targets), max(1, min(self.ray_run, n_rays, len(self.targets)))
        if run == 1:
            return torch.randint(0, total, (n_rays,), generator=gen)
        starts = torch.randint(0, total, (-(-n_rays // run),), generator=gen)
        return ((starts[:, None] + torch.arange(run)[None, :]) % total).reshape(-1)[:n_rays]

    def tv_edge(self) -> float:
        """The TV penalty's edge scale in attenuation units: `tv_edge` of the attenuation scale, in both
        phases (plain TV in the generator phase scored the same, 36.68 dB on the 25-view abdomen); 0
        (plain TV) where the data are truncated (`_truncation`) and `tv_edge_when_truncated` is off."""
        return 0.0 if self._plain_tv_because else self.cfg.tv_edge * self.field.mu_scale

    def _truncation(self, scan: ScanData) -> str | None:
        """What truncates the projections (the edge-scaled TV's known risk), or None.

        Where the object goes on beyond the detector (wider than the field of view, longer than the
        detector along the axis, a table), its material outside is in the line integrals and a volume that
        stops at the cut has to explain it with a bright rim there. Plain TV holds that rim down; the
        edge-scaled penalty lets it sharpen: on the 40-view slab at 160 px (a body 366 mm wide in a 341 mm
        field of view) 26.14 against 26.79 dB at `--time-limit 180`, before the training grid went past
        the cut sides and ends. Since it does (`extend_cut_sides`, `extend_cut_ends`, a table read from
        the data), the edge scale gains on truncated scans too, and `tv_edge_when_truncated` (on by
        default) keeps it; this says what it is kept in spite of, or why plain TV replaces it where that
        setting is off (docs/nerf.md, "The edge scale on truncated scans: the default"). Row edges whose
        ends the training grid goes on past do not count: the material there has voxels of its own. A
        displaced detector's near edge does not count (lateral_extension.truncating_edges).
        Without an air level (no support carved) truncation cannot be ruled out."""
        if self.cfg.tv_edge <= 0:
            return None
        from ..support import air_statistics, detector_edges_cut

        threshold = self.support.threshold if self.support is not None else air_statistics(scan.projections).get(
            "threshold")
        if threshold is None:
            return "no air level measured in the projections, so truncation cannot be ruled out"
        from ..lateral_extension import truncating_edges

        # a displaced detector's near edge cuts nothing its orbit does not measure
        cut = truncating_edges(scan.geometry, detector_edges_cut(scan.projections, threshold))
        # ends the training grid goes on past (axial_extension.py) hold their own material: no rim there
        extended = (self.support.extra.get("extended") or {}) if self.support is not None else {}
        cut = [edge for edge in cut if edge not in extended.get("edges", ())]
        if cut:
            return f"the object goes on beyond the detector's {', '.join(cut)} edge(s) (truncated projections)"
        return None

    def integrate(self, vol, o, d, tn, tf, jitter_seed: int = -1):
        """Line integrals of a batch. Joseph's rule visits each plane once; the stratified rule groups
        rays by chord length so each group is sampled at about `step_voxels`, not at the longest
        chord's count (short rays need fewer samples)."""
        if self.cfg.integrator == "joseph":  # one lookup per plane: no sample count to choose
            g = self.level_grid
            if self._kernel is not None:
                return fused.joseph_line_integrals(vol, g.origin_xyz, g.spacing_xyz, o, d, tn, tf)
            return fused.joseph_line_integrals_reference(vol, g.origin_xyz, g.spacing_xyz, o, d, tn, tf)
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
        g = self.level_grid
        if self._kernel is not None:
            return self._kernel(vol, g.origin_xyz, g.spacing_xyz, o, d, tn, tf, n_samples, jitter_seed)
        return fused.grid_line_integrals_reference(vol, g.origin_xyz, g.spacing_xyz, o, d, tn, tf,
                                                   n_samples, jitter_seed)

    def validation_psnr(self) -> float | None:
        if self.val is None:
            return None
        meas = self.val.targets
        with torch.no_grad():
            vol = self._training_volume()
            preds = [self.integrate(vol, *self.val.span(i, i + 65536)) for i in range(0, len(meas), 65536)]
            mse = float(((torch.cat(preds) - meas) ** 2).mean())
        return 10 * math.log10(max(float(meas.max()), 1e-12) ** 2 / max(mse, 1e-20))

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self):
        path = self.ctx.checkpoint_path
        if path is None:
            return
        from .checkpoint import save_trainer
        save_trainer(self, path)

    def load_checkpoint(self) -> bool:
        """Resume from the checkpoint (read tensors-only and checked against this run: checkpoint.py)."""
        path = self.ctx.checkpoint_path
        if path is None or not path.exists():
            return False
        from .checkpoint import restore_trainer
        restore_trainer(self, path)
        return True

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Volume | None:
        """Trains and returns the output volume; None when the run chose, early on, to train at the
        voxel the support sets (`voxel_switch`)."""
        cfg, ctx = self.cfg, self.ctx
        self.state.rays_per_batch_cap = cfg.rays_end
        resumed = ctx.resume and self.load_checkpoint()
        if not resumed:
            self.fit_fdk()
        t0 = time.perf_counter() - self.state.elapsed_s
        it = self.state.iteration
        budget = None
        if cfg.time_limit_s:
            start = ctx.clock_start if ctx.clock_start is not None else self.created_at
            budget = TimeBudget(cfg.time_limit_s, start, it, cfg.iterations,
                                cfg.iterations_cap or 4 * cfg.iterations, cost=self.iteration_cost)
            self._planned_iterations = budget.planned
        self._loop_start = time.perf_counter()
        # the voxel is still to be chosen (`_voxel_from_time`); till then the set-up lines are held
        voxel_pending = self.choose_voxel and budget is not None and not resumed
        if not voxel_pending:
            self._release_messages()
        last_loss, last_psnr = float("nan"), float("nan")
        while it < self.iterations and not ctx.should_stop():
            if budget is not None and budget.expired():
                break
            if it >= self.refine_start:
                self.switch_to_direct()
            if it >= self._freeze_start_of(self.iterations):
                self.freeze_field()
            self._update_level(it)
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
            if budget is not None:
                planned = budget.observe(it, self.output_volume)
                if planned is not None:
                    self._planned_iterations = planned
                if voxel_pending and budget.export_measured_at is not None and \
                        it >= budget.export_measured_at + self.VOXEL_RATE_ITERATIONS:
                    voxel_pending = False
                    self.voxel_switch = self._voxel_from_time(budget)
                    if self.voxel_switch is not None:
                        return None  # nothing went out yet: no progress, snapshot or checkpoint
                    self._release_messages()
                if budget.rate is not None and not budget.announced and not voxel_pending:
                    budget.announced = True
                    ctx.on_message(budget.message())
                    short = self._finer_voxel_too_short(self.iterations)
                    if short:
                        ctx.on_message("warning: " + short)
            if voxel_pending:
                continue  # nothing goes out from a run the next one may replace (about 15 iterations)
            if it % cfg.eval_every == 0 or it == self.iterations:
                val = self.validation_psnr()
                self.state.history.append((it, last_loss, last_psnr, elapsed))
                ctx.on_progress(iteration=it, iterations=self.iterations, loss=last_loss,
                                projection_psnr=last_psnr if val is None else val,
                                projection_psnr_kind="batch" if val is None else "held_out",
                                rays_per_batch=n, lr=self.optimizer.param_groups[0]["lr"],
                                elapsed_s=round(elapsed, 3), gpu_mem_mb=_gpu_mem_mb(self.device),
                                tv_weight=self.tv_weight)
            if cfg.snapshot_every and it % cfg.snapshot_every == 0 and it < self.iterations:
                t_snap = time.perf_counter()
                ctx.on_snapshot(self.output_volume(), it)
                if budget is not None:
                    budget.note_export(time.perf_counter() - t_snap)
            if cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        if self.state.history and self.state.history[-1][0] != it:
            # a last report at the exact iteration where it stopped (cancel) or ended
            self.state.history.append((it, last_loss, last_psnr, self.state.elapsed_s))
            ctx.on_progress(iteration=it, iterations=self.iterations, loss=last_loss,
                            projection_psnr=last_psnr, projection_psnr_kind="batch",
                            rays_per_batch=self.state.rays_per_batch, lr=self.optimizer.param_groups[0]["lr"],
                            elapsed_s=round(self.state.elapsed_s, 3), gpu_mem_mb=_gpu_mem_mb(self.device),
                            tv_weight=self.tv_weight)
        self._release_messages()  # stopped before the voxel was chosen
        if budget is not None:
            ctx.report["time_budget"] = budget.summary(it, self.iterations, ctx.should_stop())
            ctx.on_message(budget.final_message(it, self.iterations))
        self.save_checkpoint()
        return self.output_volume()


class TimeBudget:
    """Plans the iteration count so that a run ends within a wall-clock limit.

    The rate is measured on the run itself: first after a few iterations, then again every few
    per cent of the plan over the latest window (the cost per iteration changes as the ray batch
    grows and when the refinement phase adds the detail grid), and the plan is set to what the rest of
    the time allows. The learning-rate schedule, the ray curriculum and the refinement phase follow
    the plan (they are fractions of it), so a shorter run is a complete, shorter schedule rather than
    a long one cut off. A reserve is kept for the export, the final checkpoint and the worker's files
    and scores; the loop also stops outright at the deadline, but never before `MIN_ITERATIONS`
    (an untrained field is no result: a limit shorter than the set-up plus those few iterations is
    overrun, and the report says so). Iterations do not all cost the same (a coarse level, a
    smaller ray batch): with `cost` (relative cost of iterations under a plan) the rate is measured
    in cost units and the plan is the longest one whose remaining cost fits the time left.
    """

    MIN_ITERATIONS = 25

    def __init__(self, limit_s: float, start: float, iteration: int, iterations: int, cap: int, cost=None):
        self.limit_s = float(limit_s)
        self.cost = cost
        """callable(iterations: ndarray, planned: int) -> ndarray of relative costs, or None (all equal)."""
        self.start = start
        self.cap = max(1, int(cap))
        self.initial = max(1, min(int(iterations), self.cap))
        self.planned = self.initial
        self.export_s: float | None = None
        self._samples: list[tuple[int, float]] = []
        self._first_iteration = iteration
        self._next_plan = iteration + 3
        self.rate: float | None = None
        self.export_measured_at: int | None = None
        """The iteration after which the export was timed (its interval holds the export too)."""
        self.deadline_hit = False
        self.announced = False
        self.min_iterations = min(self.MIN_ITERATIONS, self.initial)
        self._iteration = iteration
        self.forced = False

    @property
    def reserve_s(self) -> float:
        """Time kept for the end: export, last checkpoint, the worker's volume, previews and scores."""
        export = self.export_s if self.export_s is not None else 0.0
        return 1.0 + 0.03 * self.limit_s + 3.0 * export

    def remaining(self, now: float | None = None) -> float:
        now = time.perf_counter() if now is None else now
        return self.start + self.limit_s - self.reserve_s - now

    def expired(self) -> bool:
        if self.deadline_hit:
            return True
        if self.remaining() > 0:
            return False
        if self._iteration - self._first_iteration < self.min_iterations:
            self.forced = True  # past the deadline, but not yet a result: carry on
            return False
        self.deadline_hit = True
        return True

    def note_export(self, seconds: float):
        self.export_s = seconds if self.export_s is None else max(0.5 * self.export_s, seconds)

    def observe(self, it: int, export) -> int | None:
        """After iteration `it`: a new plan when it is time to re-plan, else None."""
        now = time.perf_counter()
        self._iteration = it
        self._samples.append((it, now))
        if it < self._next_plan or it >= self.planned:
            return None
        if self.export_s is None:  # measured once: the export is the end's largest cost
            t = time.perf_counter()
            export()
            self.note_export(time.perf_counter() - t)
            self.export_measured_at = it
            now = time.perf_counter()
        # the rate over the latest window (skip the first iteration: set-up and first-call costs)
        window = max(3, self.planned // 40)
        recent = [(i, t) for i, t in self._samples if i > self._first_iteration + 1][-window - 1:]
        if len(recent) < 2:
            self._next_plan = it + 1
            return None
        (i0, t0), (i1, t1) = recent[0], recent[-1]
        self.rate = max(1, i1 - i0) / max(t1 - t0, 1e-6)
        seconds_per_unit = self._seconds_per_unit(recent)
        planned = self._longest_plan(it, self.remaining(now), seconds_per_unit)
        planned = max(it + 1, self._first_iteration + self.min_iterations, min(planned, self.cap))
        # re-plan every ~2.5 % of the plan (more often early), never in the last ~3 %
        self._next_plan = it + max(5, planned // 40)
        if planned - it < max(3, planned // 30):
            self._next_plan = 1 << 60
        self.planned = planned
        return planned

    def _units(self, start: int, stop: int, planned: int) -> float:
        """Cost units of iterations start..stop-1 under a plan (one per iteration without `cost`)."""
        if stop <= start:
            return 0.0
        if self.cost is None:
            return float(stop - start)
        return float(np.sum(self.cost(np.arange(start, stop), planned)))

    def seconds_per_unit_since(self, iteration: int) -> float | None:
        """Seconds per cost unit over every iteration measured after `iteration` (None before two
        samples): a steadier rate than the latest window's early in the run."""
        samples = [(i, t) for i, t in self._samples if i > iteration]
        return self._seconds_per_unit(samples) if len(samples) >= 2 else None

    def _seconds_per_unit(self, samples: list[tuple[int, float]]) -> float:
        """Seconds per cost unit between the first and the last of (iteration, time) samples."""
        (i0, t0), (i1, t1) = samples[0], samples[-1]
        return max((t1 - t0) / max(self._units(i0, i1, self.planned), 1e-9), 1e-9)

    def plan_from(self, it: int, left_s: float, seconds_per_unit: float, cost_factor: float = 1.0) -> int:
        """The longest plan (at most the cap) whose iterations from `it` on fit in `left_s` when each costs
        `cost_factor` times what `seconds_per_unit` says: what another grid's run would plan."""
        return min(self.cap, self._longest_plan(it, left_s, seconds_per_unit * cost_factor))

    def _longest_plan(self, it: int, left_s: float, seconds_per_unit: float) -> int:
        """The largest plan (at most the cap) whose iterations from `it` on fit in `left_s`."""
        if left_s <= 0:
            return it
        if self.cost is None:
            return it + int(left_s / seconds_per_unit)
        fits = lambda n: self._units(it, n, n) * seconds_per_unit <= left_s  # noqa: E731
        if fits(self.cap):
            return self.cap
        lo, hi = it, self.cap  # fits(lo), not fits(hi); cost grows with the plan's length
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def message(self) -> str:
        rate = "" if self.rate is None else f" at {self.rate:.2f} it/s"
        return (f"time limit {self.limit_s:g} s: planning {self.planned} iterations{rate} "
                f"(the preset's count is {self.initial}; re-planned as the run goes)")

    def summary(self, done: int, planned: int, cancelled: bool) -> dict:
        return dict(limit_s=self.limit_s, iterations_done=int(done), iterations_planned=int(planned),
                    preset_iterations=self.initial, iterations_cap=self.cap,
                    rate_it_per_s=None if self.rate is None else round(self.rate, 3),
                    reserve_s=round(self.reserve_s, 2), stopped_at_deadline=bool(self.deadline_hit),
                    limit_too_short=bool(self.overrun),
                    cancelled=bool(cancelled), training_s=round(time.perf_counter() - self.start, 2))

    @property
    def overrun(self) -> bool:
        """The limit was too short for the set-up and the minimum iterations."""
        return self.forced

    def final_message(self, done: int, planned: int) -> str:
        took = time.perf_counter() - self.start
        if self.overrun:
            return (f"time limit {self.limit_s:g} s: too short for this scan here (set-up and the minimum "
                    f"{self.min_iterations} iterations took {took:.0f} s); {done} iterations made")
        how = "stopped at the deadline" if self.deadline_hit else "schedule complete"
        return f"time limit {self.limit_s:g} s: {done} of {planned} planned iterations, {how}, {took:.0f} s so far"


def _tv(vol: torch.Tensor, edge: float, fused_kernel: bool = True) -> torch.Tensor:
    """Anisotropic total variation per voxel (the mean penalty of forward differences, edge-scaled):
    the fused kernel where it is built and wanted (fused.total_variation), the same sum in PyTorch
    otherwise."""
    return fused.total_variation(vol, edge) if fused_kernel else fused.total_variation_reference(vol, edge)


def _gpu_mem_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)


def _pick_integrator(device: torch.device, use_kernels: bool):
    """The fused grid integrator when it is built for this device, else None (PyTorch path)."""
    if not use_kernels or not fused.kernels_available(device):
        return None
    return fused.grid_line_integrals
