"""How much memory a nerf run needs, estimated from the scan, the grids and the settings before any
work, and the refusal when the machine does not have it.

The figures are upper bounds of what the trainer holds at once (train.py): the rays of every training
pixel (origin, direction, near, far, or only the pixel's index on a large scan, nerf/ray_table.py; the
measurement and its weight), the projections, the training
grid's per-voxel tensors during a step (the field, the detail grid, their sum, gradients, Adam
moments and the TV differences: about 16 float32 a voxel), the planes and lines with their generator
activations, the renderer's working memory for the largest ray batch, and the output volume with its
few copies. On CUDA the device part is compared with the GPU's free memory; the host part always with
the available RAM (psutil).
"""
from __future__ import annotations

import math

GIB = float(2 ** 30)


def estimate(scan, out_grid, settings: dict, device: str) -> dict:
    """Bytes by part, and which of them live on the device ('device') or on the host ('host')."""
    from .config import NerfConfig
    from .train import training_grid

    cfg = NerfConfig.from_settings(settings)
    tgrid = _grown_past_cuts(scan, training_grid(out_grid, cfg), cfg)  # an upper bound of the trainer's grid
    views, rows, cols = (int(s) for s in scan.projections.shape)
    rays = views * rows * cols
    voxels = tgrid.n_voxels
    res = cfg.plane_resolution or max(tgrid.shape_xyz)
    n_samples = math.ceil(math.sqrt(3.0) * max(tgrid.shape_xyz) / max(cfg.step_voxels, 1e-3))
    per_sample = 8 if cfg.use_kernels else 96
    parts = {
        # origin, direction, near, far (or, above stored_rays_bytes, the pixel's index), target, PWLS weight
        "rays": rays * ((8 * 4 if rays * 32 <= cfg.stored_rays_bytes else 4) + 2 * 4 + 1),
        "training_grid": voxels * 16 * 4,
        "factors": (3 * cfg.channels * res * res + 3 * cfg.channels * res) * 4 * 4
                   + (3 * cfg.generator_width * res * res * 6 * 4 * 2 if cfg.use_generator else 0),
        "ray_batch": cfg.rays_end * n_samples * per_sample,
    }
    host = {"projections": rays * 4 * 2, "output_volume": out_grid.n_voxels * 4 * 4}
    on_gpu = str(device).startswith("cuda")
    if not on_gpu:
        host.update(parts)
        parts = {}
    return {"device": parts, "host": host, "device_name": device,
            "training_grid": list(tgrid.shape_xyz), "rays": rays, "rays_per_batch": cfg.rays_end}


def _grown_past_cuts(scan, full, cfg):
    """The full box (an upper bound of the carved support's box), widened past its sides where the
    object is wider than the field of view (lateral_extension.py) and grown past the ends the detector
    cuts along the axis (axial_extension.py, with the widened box's radius), as the trainer will grow
    its own: on the 25-view abdomen cut to 120 rows the trainer's grid is 7 % larger than the full box."""
    if not cfg.support:
        return full
    from ..axial_extension import plan_for_scan
    from ..support import air_statistics
    from .train import _lateral_extension

    lateral, stats = _lateral_extension(scan, full, cfg)
    if lateral is not None:
        full = lateral.grown(full)
    threshold = (stats or air_statistics(scan.projections)).get("threshold")
    if threshold is None or not cfg.extend_cut_ends:
        return full
    extension = plan_for_scan(scan.projections, scan.geometry, threshold, *full.bounds(), full.spacing_xyz)
    return full if extension is None else extension.grown(full)


def check_fits(est: dict, available_host: int | None = None, available_device: int | None = None):
    """Raise MemoryError naming the figures and the fix when the estimate does not fit."""
    import psutil

    host = sum(est["host"].values())
    device = sum(est["device"].values())
    if available_host is None:
        available_host = psutil.virtual_memory().available
    problems = []
    if host > available_host:
        problems.append(f"about {host / GIB:.1f} GiB of RAM but {available_host / GIB:.1f} GiB are available "
                        f"({_largest(est['host'])})")
    if est["device"]:
        if available_device is None:
            import torch

            available_device = torch.cuda.mem_get_info()[0]
        if device > available_device:
            problems.append(f"about {device / GIB:.1f} GiB of GPU memory but {available_device / GIB:.1f} GiB are "
                            f"free ({_largest(est['device'])})")
    if problems:
        raise MemoryError(
            f"this nerf run ({est['rays']} rays, training grid {est['training_grid']}, {est['rays_per_batch']} rays "
            f"a batch) needs {' and '.join(problems)}; refused before any work. Fix: give a coarser "
            "--grid-spacing or a smaller --grid-size, use --preset preview (smaller batches), downsample the "
            "projections, or use --method fdk")


def _largest(parts: dict) -> str:
    name, size = max(parts.items(), key=lambda kv: kv[1])
    return f"mostly {name.replace('_', ' ')}: {size / GIB:.1f} GiB"
