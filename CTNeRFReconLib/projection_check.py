"""Rendered against measured projections: the data-consistency view of a reconstruction.

The reconstruction is forward-projected through every view's own geometry with the renderer the
nerf method trains with (the fused grid line integral, fused.py, on the volume's grid: trilinear,
rays between the outermost voxel centres as in training and RTK's Joseph projector) and compared
with the measured line integrals. Per view, the residual is the RMSE over the detector. A
reconstruction that fits the data leaves residuals at the noise level in every view; a view whose
geometry is wrong (a mislabelled angle, a detector shift), a corrupted projection, or a view
outside the training set (held-out views) stands out above the others, at once, in the plot of the
residual against the view angle. The picture (projection_check.png) shows one view as measured,
as rendered and their difference side by side, above that plot; by default the view with the
largest residual.

The per-view RMSE is computed on every `stride`-th detector row and column, the stride chosen so
that at most `MAX_CHECK_RAYS` rays are rendered (a residual is a mean: a regular subsample of a
thousand or more pixels per view estimates it well); the view shown is rendered at full resolution.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .data import ScanData, Volume

MAX_CHECK_RAYS = 1 << 16
"""Rays rendered for the per-view residuals (all views together): about 1600 pixels a view for 40
views, which estimates a view's RMSE to a few per cent, for a fraction of a second of rendering (the
worker runs the check at the end of every run, FDK's included)."""
LIVE_CHECK_RAYS = 1 << 14
"""Rays rendered for the residuals of a snapshot while the run trains (`LiveResiduals`): a quarter of the
end-of-run check's (every 10th row and column of the 25-view abdomen's 240 x 240 views), enough to see a
view stand out, at a quarter of the cost: 0.15 s a check in the worker on 2 cores for that abdomen's
233 x 240 x 233 default grid, six checks in a 120 s run (0.8 % of it). The per-view figures are noisier
than the final check's (the abdomen's largest ratio to the median 2.3 against 1.5)."""
RESIDUALS_EVERY_S = 10.0
"""Seconds at least between two live residual checks (`reconstruct --residuals-every`, `LiveResiduals`); the
checks also take at most 2 % of the run's time."""
STEP_VOXELS = 0.8
"""Sample spacing along rays, in voxels of the volume (as the nerf method's training)."""


SUSPECT_RATIO = 3.0
"""A training view whose residual is more than this many times the median is named as suspect (a bad
frame or a geometry error): the run's console and the Slicer panel's log suggest leaving it out."""


def suspect_view(check: dict, dropped=()) -> int | None:
    """The view of the data (counted before `dropped` was left out, i.e. as the user names views for
    `--drop-views`) that a projection check's result or event singles out, or None: its largest residual
    is a training view's and more than SUSPECT_RATIO times the median. Held-out views are not the data's
    to drop."""
    worst, median = check.get("worst_view"), check.get("median_rmse")
    rmse = check.get("rmse") or []
    if worst is None or not median or worst in (check.get("held_out") or ()) or not 0 <= worst < len(rmse):
        return None
    if rmse[worst] is None or rmse[worst] <= SUSPECT_RATIO * median:
        return None
    view = int(worst)
    for gone in sorted(set(int(v) for v in dropped)):  # back to the data's numbering
        if gone <= view:
            view += 1
    return view


def view_angles_deg(geometry) -> np.ndarray:
    """The gantry angle of each view in degrees: the geometry's own angles where it has them, else the
    source's azimuth about the frame's rotation axis (RTK: y, source at +z at 0; TIGRE: z, +x at 0)."""
    if getattr(geometry, "angles", None) is not None and len(geometry.angles) == geometry.n_views:
        return np.degrees(np.asarray(geometry.angles, dtype=float))
    s = np.asarray(geometry.sources, dtype=float)
    if getattr(geometry, "frame", "") == "rtk":
        return np.degrees(np.arctan2(s[:, 0], s[:, 2]))
    return np.degrees(np.arctan2(s[:, 1], s[:, 0]))


def _rays(geometry, views, stride: int, grid, device):
    from .rays import view_rays
    from .render import centre_bounds

    n_v, n_u = geometry.det_shape
    rows = np.arange((stride - 1) // 2, n_v, stride) if stride > 1 else np.arange(n_v)
    cols = np.arange((stride - 1) // 2, n_u, stride) if stride > 1 else np.arange(n_u)
    vv, rr, cc = np.meshgrid(np.asarray(views), rows, cols, indexing="ij")
    lo, hi = centre_bounds(grid) if grid.is_axis_aligned else grid.bounds()
    rays = view_rays(geometry, vv.reshape(-1), rr.reshape(-1), cc.reshape(-1), lo, hi, device=device)
    return rays, (len(np.atleast_1d(views)), len(rows), len(cols)), rows, cols


def render_projections(volume: Volume, geometry, views, stride: int = 1, device: str = "cpu",
                       chunk_rays: int = 1 << 16) -> np.ndarray:
    """Line integrals of the volume through the given views, (views, rows/stride, cols/stride)."""
    import torch

    from . import fused
    from .render import RenderConfig, VoxelField, line_integrals

    grid = volume.grid
    vol = torch.as_tensor(np.ascontiguousarray(volume.array, dtype=np.float32), device=device)
    rays, shape, _, _ = _rays(geometry, views, stride, grid, device)
    step = STEP_VOXELS * float(min(grid.spacing_xyz))
    out = []
    with torch.no_grad():
        for i in range(0, len(rays), chunk_rays):
            sub = rays.index(slice(i, i + chunk_rays))
            longest = float((sub.t_far - sub.t_near).max()) if len(sub) else 0.0
            n = max(8, int(math.ceil(longest / step)))
            if grid.is_axis_aligned:
                out.append(fused.grid_line_integrals(vol, grid.origin_xyz, grid.spacing_xyz, sub.origins,
                                                     sub.directions, sub.t_near, sub.t_far, n, -1))
            else:
                out.append(line_integrals(VoxelField(vol, grid), sub, RenderConfig(n_samples=n)))
    return torch.cat(out).reshape(shape).cpu().numpy()


def residual_stride(scan: ScanData, max_rays: int = MAX_CHECK_RAYS) -> int:
    n_v, n_u = scan.geometry.det_shape
    return max(1, int(math.ceil(math.sqrt(scan.n_views * n_v * n_u / max_rays))))


def projection_residuals(volume: Volume, scan: ScanData, stride: int | None = None, device: str = "cpu") -> np.ndarray:
    """RMSE of rendered against measured line integrals, per view (on every stride-th pixel)."""
    stride = residual_stride(scan) if stride is None else int(stride)
    pred = render_projections(volume, scan.geometry, np.arange(scan.n_views), stride, device)
    n_v, n_u = scan.geometry.det_shape
    r0 = (stride - 1) // 2 if stride > 1 else 0
    meas = np.asarray(scan.projections, dtype=np.float32)[:, r0::stride, r0::stride][:, :pred.shape[1], :pred.shape[2]]
    squared = (pred.astype(np.float64) - meas) ** 2
    if scan.defects is None:
        return np.sqrt(squared.mean(axis=(1, 2)))
    # dead pixels hold their neighbour's value, not a measurement: left out, as from the fit
    kept = ~scan.defects[:, r0::stride, r0::stride][:, :pred.shape[1], :pred.shape[2]]
    return np.sqrt((squared * kept).sum(axis=(1, 2)) / np.maximum(kept.sum(axis=(1, 2)), 1))


def residual_summary(volume: Volume, scan: ScanData, device: str = "cpu", max_rays: int = MAX_CHECK_RAYS) -> dict:
    """The per-view residuals and what stands out, without rendering a view in full or drawing: `rmse`
    (training views, then the data's held-out views), `angles_deg`, `held_out` (indices into `rmse`),
    `median_rmse` (over the training views), `worst_view`, `worst_ratio`, `stride`."""
    stride = residual_stride(scan, max_rays)
    rmse = list(projection_residuals(volume, scan, stride, device))
    angles = list(view_angles_deg(scan.geometry))
    held = []
    val = getattr(scan, "validation", None)
    if val is not None and val.n_views:
        extra = projection_residuals(volume, val, residual_stride(val, max_rays), device)
        held = list(range(len(rmse), len(rmse) + val.n_views))
        rmse += list(extra)
        angles += list(view_angles_deg(val.geometry))
    rmse_a = np.asarray(rmse, dtype=float)
    median = float(np.median(rmse_a[:scan.n_views]))
    worst = int(np.argmax(rmse_a))
    return dict(rmse=[float(x) for x in rmse_a], angles_deg=[float(a) for a in angles], held_out=held,
                median_rmse=median, worst_view=worst,
                worst_ratio=float(rmse_a[worst] / median) if median > 0 else float("inf"), stride=stride)


def projection_check(volume: Volume, scan: ScanData, png_path=None, view: int | None = None,
                     device: str = "cpu", title: str = "") -> dict:
    """Residual per view (training views, then the data's held-out views), one view rendered in full
    beside its measurement and the difference, and (png_path) the picture. Returns the summary:
    `view` (index over training views then held-out ones), `angle_deg`, `rmse` per view, `angles_deg`,
    `held_out` (indices of held-out views), `median_rmse`, `worst_view`, `worst_ratio`, `stride`, `path`."""
    summary = residual_summary(volume, scan, device)
    n_all = len(summary["rmse"])
    if view is None:
        view = summary["worst_view"]
    if not (0 <= int(view) < n_all):
        from .formats.validate import ScanFormatError

        held = summary["held_out"]
        raise ScanFormatError("--view", "--view", f"is {view}; the scan has views 0 to {n_all - 1}"
                              + (f" (held-out views {held[0]} to {held[-1]})" if held else ""),
                              "give a view index in that range")
    view = int(view)
    src, k = (scan, view) if view < scan.n_views else (scan.validation, view - scan.n_views)
    rendered = render_projections(volume, src.geometry, [k], 1, device)[0]
    measured = np.asarray(src.projections[k], dtype=np.float32)
    result = dict(view=view, angle_deg=summary["angles_deg"][view], **summary, path=None)
    if png_path is not None:
        result["path"] = str(write_check_png(png_path, measured, rendered, result, title))
    return result


class LiveResiduals:
    """The per-view residuals of a run's snapshots while it trains (the worker's `residuals` event), so
    that a bad view or a geometry error shows long before the end. A check costs a fraction of a second
    on 2 cores (at most `LIVE_CHECK_RAYS` rays); it runs at a snapshot only when at least `min_interval_s`
    have passed since the last one and that last one cost at most `max_share` of the time since, so it
    takes at most that share of the run."""

    def __init__(self, scan: ScanData, device: str = "cpu", min_interval_s: float = RESIDUALS_EVERY_S,
                 max_share: float = 0.02, clock=None):
        import time

        self.scan, self.device = scan, device
        self.min_interval_s, self.max_share = min_interval_s, max_share
        self.clock = clock or time.perf_counter
        self.last_end = self.clock()  # the first check comes `min_interval_s` after the start
        self.cost = 0.0

    def due(self) -> bool:
        return self.clock() - self.last_end >= max(self.min_interval_s, self.cost / self.max_share)

    def __call__(self, volume: Volume) -> dict:
        t0 = self.clock()
        summary = residual_summary(volume, self.scan, self.device, LIVE_CHECK_RAYS)
        self.last_end = self.clock()
        self.cost = self.last_end - t0
        return {**summary, "cost_s": round(self.cost, 3)}


def write_check_png(path, measured: np.ndarray, rendered: np.ndarray, result: dict, title: str = "") -> Path:
    """measured | rendered | difference (row 0 at the top) above the per-view RMSE against the angle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .volume_io import atomic_write

    view, rmse = result["view"], np.asarray(result["rmse"])
    angles = np.asarray(result["angles_deg"])
    held = np.zeros(len(rmse), dtype=bool)
    held[result["held_out"]] = True
    fig = plt.figure(figsize=(10.5, 6.6))
    # fixed margins (tight_layout measured every text: 0.4 s of each run's end)
    gs = fig.add_gridspec(2, 3, height_ratios=(1.15, 1.0), left=0.065, right=0.935, bottom=0.08,
                          top=0.88 if title else 0.91, wspace=0.15, hspace=0.15)
    vmax = float(max(np.percentile(measured, 99.9), np.percentile(rendered, 99.9), 1e-6))
    diff = rendered - measured
    dmax = float(max(np.percentile(np.abs(diff), 99.5), 1e-6))
    kind = "held-out" if held[view] else "training"
    for i, (img, name, cmap, lo, hi) in enumerate((
            (measured, "measured", "gray", 0.0, vmax), (rendered, "rendered", "gray", 0.0, vmax),
            (diff, "rendered - measured", "RdBu_r", -dmax, dmax))):
        ax = fig.add_subplot(gs[0, i])
        im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    ax = fig.add_subplot(gs[1, :])
    order = np.argsort(angles[~held])
    ax.plot(angles[~held][order], rmse[~held][order], "-o", ms=3, lw=1, color="tab:blue", label="training views")
    if held.any():
        ax.plot(angles[held], rmse[held], "s", ms=5, color="tab:orange", label="held-out views")
    med = result["median_rmse"]
    ax.axhline(med, color="0.4", ls="--", lw=1, label=f"median {med:.3g}")
    ax.axhline(3 * med, color="tab:red", ls=":", lw=1, label="3 x median")
    ax.plot([angles[view]], [rmse[view]], "o", ms=10, mfc="none", mec="tab:red", mew=1.5, label=f"view {view} (shown)")
    ax.set_xlabel("view angle (degrees)")
    ax.set_ylabel("RMSE of line integrals")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    head = (f"view {view} ({kind}) at {angles[view]:.1f} deg: RMSE {rmse[view]:.3g} "
            f"= {rmse[view] / med if med > 0 else float('inf'):.1f} x the median")
    fig.suptitle((title + "\n" if title else "") + head, fontsize=11)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return Path(path)


def check_run(run_dir, view: int | None = None, out=None, device: str = "cpu", use_field: bool = False,
              on_message=lambda text: None) -> dict:
    """`check RUN_DIR`: the projection check of an existing run (finished or running).

    The volume is the run's volume.nrrd (else its snapshot.nrrd); with `use_field` (or when the run
    has no volume yet) the trained field from its checkpoint on the output grid. The data are read
    from where run.json says. Writes RUN_DIR/projection_check.png unless `out` names another file."""
    from .field_export import check_run_dir, read_run_json, _refuse
    from .formats import load_scan
    from .volume_io import read_volume

    run_dir = check_run_dir(run_dir)
    out = Path(out) if out is not None else run_dir / "projection_check.png"
    if out.suffix.lower() != ".png":
        raise _refuse(out, "--out", "is not a .png file name", "give a file name ending in .png")
    info = read_run_json(run_dir) or {}
    options = info.get("options") or {}
    if not options.get("data"):
        raise _refuse(run_dir / "run.json", "options.data", "does not name the run's data",
                      "check a run folder written by `reconstruct`")
    proj = options.get("projections")
    # the views the run was fitted to, numbered as its own end-of-run check numbered them
    scan = load_scan(Path(options["data"]), projections=None if not proj else Path(proj),
                     drop_views=tuple(options.get("drop_views") or ()))
    if view is not None and not (0 <= int(view) < scan.n_views + (scan.validation.n_views if scan.validation else 0)):
        raise _refuse("--view", "--view", f"is {view}; the scan has {scan.n_views} views (0 to {scan.n_views - 1})",
                      "give a view index in that range")
    volume, what = None, ""
    if not use_field:
        for name in ("volume.nrrd", "snapshot.nrrd"):
            if (run_dir / name).is_file():
                volume, what = read_volume(run_dir / name), name
                break
    if volume is None:
        from .field_export import load_run_field

        rf = load_run_field(run_dir, device=device)
        volume, what = rf.on_grid(rf.output_grid), rf.note
    on_message(f"rendering {what} through {scan.n_views} views")
    title = f"{info.get('method', '')} run {run_dir.name}: {what}"
    return projection_check(volume, scan, out, view=view, device=device, title=title)
