"""`--method nerf`: the deep-prior TensoRF-VM reconstruction, registered for the worker."""
from __future__ import annotations

import logging
from dataclasses import replace

from ..data import ScanData, Volume
from ..geometry import VolumeGrid
from ..methods import RunContext, register
from .config import NerfConfig
from .train import NerfTrainer, reuse_support, training_grid

log = logging.getLogger(__name__)


def fdk_warm_start(scan: ScanData, grid: VolumeGrid, device: str) -> Volume | None:
    """FDK on the training grid: the warm start and the attenuation scale. None if FDK is unavailable."""
    try:
        from ..fdk import FDKConfig, fdk
    except ImportError:
        log.warning("FDK is not available: the nerf method starts without a warm start")
        return None
    return fdk(scan, grid, FDKConfig(filter="hann", clip_negative=True), device=device)


def timed_voxel_choice(cfg: NerfConfig) -> bool:
    """Whether the time limit chooses the training voxel (`voxel_from_time_limit`)."""
    return bool(cfg.time_limit_s and cfg.voxel_from_time_limit and cfg.support)


def voxel_for_time_limit(cfg: NerfConfig, checkpoint_config: dict | None = None) -> tuple[NerfConfig, bool]:
    """(The configuration a run starts with, whether its time budget chooses the voxel). Where the time
    limit chooses it, a run starts at the voxel the cap on the field of view allows, and a resumed one
    (`checkpoint_config`: its checkpoint's settings) keeps the voxel it was trained at."""
    if not timed_voxel_choice(cfg):
        return cfg, False
    if checkpoint_config is not None:
        return replace(cfg, support_sets_voxel=bool(checkpoint_config.get("support_sets_voxel", False))), False
    return replace(cfg, support_sets_voxel=False), True


def _trainer(scan: ScanData, grid: VolumeGrid, cfg: NerfConfig, ctx: RunContext, choose: bool) -> NerfTrainer:
    fdk_volume = None
    if cfg.fdk_init_iterations > 0:
        fdk_volume = fdk_warm_start(scan, training_grid(grid, cfg), ctx.device)
    return NerfTrainer(scan, grid, cfg, ctx, fdk_volume=fdk_volume, choose_voxel=choose)


@register("nerf")
class NerfMethod:
    """Fits a generator of VM planes/lines to the projections; exports on the requested grid."""

    def reconstruct(self, scan: ScanData, grid: VolumeGrid, ctx: RunContext) -> Volume:
        cfg = NerfConfig.from_settings(ctx.settings)
        checkpoint_config = None
        path = ctx.checkpoint_path
        if ctx.resume and path is not None and path.exists() and timed_voxel_choice(cfg):
            from .checkpoint import read_checkpoint
            checkpoint_config = read_checkpoint(path, map_location="cpu")["config"]
        cfg, choose = voxel_for_time_limit(cfg, checkpoint_config)
        trainer = _trainer(scan, grid, cfg, ctx, choose)
        volume = trainer.run()
        if trainer.voxel_switch is not None:  # the time limit buys the voxel the support sets
            if ctx.clock_start is None:
                ctx.clock_start = trainer.created_at  # the limit counts from the first trainer's start
            finer = trainer.voxel_switch
            del trainer  # its rays and model go before the next trainer's are made
            volume = _trainer(scan, grid, finer, ctx, choose=False).run()
        return volume

    def check_memory(self, scan: ScanData, grid: VolumeGrid, settings: dict, device: str) -> None:
        """Before any work: refuse (MemoryError with the figures and the fix) a run that cannot fit."""
        from .memory import check_fits, estimate
        check_fits(estimate(scan, grid, settings, device))

    def check_resume(self, scan: ScanData, grid: VolumeGrid, ctx: RunContext) -> None:
        """Before any work: refuse a checkpoint in ctx.run_dir that is unsafe, broken, of another
        version, or made for other data, grid, model settings or seed (ScanFormatError)."""
        path = ctx.checkpoint_path
        if path is None or not path.exists():
            return
        from .checkpoint import check_trainer_checkpoint, read_checkpoint, support_of
        ck = read_checkpoint(path, map_location="cpu")
        cfg = voxel_for_time_limit(NerfConfig.from_settings(ctx.settings), ck.get("config"))[0]
        reuse_support(scan, grid, cfg, support_of(ck, path))  # the support it was trained with
        tgrid = training_grid(grid, cfg, scan)  # the trainer's own: over the support carved from the scan
        check_trainer_checkpoint(ck, path, scan, tgrid, cfg, ctx.seed)
