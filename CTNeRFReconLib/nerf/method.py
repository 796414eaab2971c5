"""`--method nerf`: the deep-prior TensoRF-VM reconstruction, registered for the worker."""
from __future__ import annotations

import logging

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


@register("nerf")
class NerfMethod:
    """Fits a generator of VM planes/lines to the projections; exports on the requested grid."""

    def reconstruct(self, scan: ScanData, grid: VolumeGrid, ctx: RunContext) -> Volume:
        cfg = NerfConfig.from_settings(ctx.settings)
        fdk_volume = None
        if cfg.fdk_init_iterations > 0:
            fdk_volume = fdk_warm_start(scan, training_grid(grid, cfg), ctx.device)
        trainer = NerfTrainer(scan, grid, cfg, ctx, fdk_volume=fdk_volume)
        return trainer.run()

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
        cfg = NerfConfig.from_settings(ctx.settings)
        ck = read_checkpoint(path, map_location="cpu")
        reuse_support(scan, grid, cfg, support_of(ck, path))  # the support it was trained with
        tgrid = training_grid(grid, cfg, scan)  # the trainer's own: over the support carved from the scan
        check_trainer_checkpoint(ck, path, scan, tgrid, cfg, ctx.seed)
