"""`demo`: simulate a phantom scan at run time, reconstruct it as `reconstruct` would, and score it.

The projections are exact line integrals of the 3D Shepp-Logan ellipsoids (closed-form chord
lengths, independent of any projector) on a circular RTK-frame orbit, with Poisson noise. The
case is written as an RTK case (geometry.xml, projections.mha, reference.nrrd) so the
reconstruction reads it through the same loaders and the same worker as user data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import ScanData, Volume
from .events import ExitCode
from .fov import default_grid
from .geometry import circular_geometry
from .phantom import phantom_line_integrals, shepp_logan_3d, voxelize
from .rays import all_pixel_indices, view_rays


@dataclass(frozen=True)
class DemoCase:
    """The simulated scan: a circular cone-beam orbit around the phantom."""

    views: int = 30
    """30, not more: at the demo's ~45 s budget on 2 cores (a few hundred iterations) FDK's streaks
    grow faster than the nerf's error as views are removed, so the comparison shows the method's use
    even on a busy machine (200 iterations: 23.7 dB / 0.871 against FDK's 22.2 / 0.354; with 40 views
    21.2 / 0.77 against 22.8 / 0.39 after 150)."""
    det: int = 128
    """Detector pixels per side."""
    pitch: float = 2.4
    """Detector pixel pitch in mm (1.6 mm at the isocentre)."""
    sid: float = 1000.0
    sdd: float = 1500.0
    i0: float = 1e5
    """Photons per detector pixel without object (Poisson noise)."""
    phantom_mm: float = 100.0
    """Half-size of the phantom."""
    seed: int = 0
    supersample: int = 3
    """Samples per voxel side of the voxelised ground truth, in the voxels an edge crosses (elsewhere a
    voxel is uniform): the ground truth holds the partial volumes the projections measure."""


FULL = DemoCase()
SMALL = DemoCase(views=24, det=48, pitch=6.4, supersample=2)
"""A case that reconstructs in seconds, for smoke tests (--small)."""


def simulate_phantom_scan(case: DemoCase) -> tuple[ScanData, Volume]:
    """Noisy line integrals of the phantom and its voxelised ground truth on the default grid."""
    angles = 2 * np.pi * np.arange(case.views) / case.views
    geometry = circular_geometry(case.sid, case.sdd, angles, (case.det, case.det), (case.pitch, case.pitch),
                                 axis="y")
    ellipsoids = shepp_logan_3d(case.phantom_mm)
    views, rows, cols = all_pixel_indices(geometry)
    big = np.full(3, 4 * case.sdd)
    rays = view_rays(geometry, views, rows, cols, -big, big, dtype=torch.float64)
    clean = phantom_line_integrals(ellipsoids, rays.origins.numpy(), rays.directions.numpy())
    clean = clean.reshape(case.views, case.det, case.det)
    rng = np.random.default_rng(case.seed)
    counts = rng.poisson(case.i0 * np.exp(-clean))
    noisy = -np.log(np.maximum(counts, 1) / case.i0).astype(np.float32)
    scan = ScanData(noisy, geometry, source_format="phantom", source_path="<shepp-logan demo>",
                    notes=[f"3D Shepp-Logan phantom, exact line integrals, Poisson noise I0={case.i0:g}"])
    grid = default_grid(geometry)
    return scan, Volume(voxelize_partial(ellipsoids, grid, case.supersample), grid)


def voxelize_partial(ellipsoids, grid, supersample: int = 3) -> np.ndarray:
    """Mean phantom value in each voxel (z, y, x): the centre value in voxels whose neighbourhood is
    uniform, the supersampled mean in the voxels an edge may cross (where a neighbour differs).

    The same as `phantom.voxelize(..., supersample)` up to edges thinner than a voxel that no centre
    sees, at a fraction of its cost (only the edge voxels are supersampled)."""
    from scipy import ndimage

    from .phantom import phantom_values

    centre = voxelize(ellipsoids, grid, 1)
    edge = ndimage.maximum_filter(centre, size=3) != ndimage.minimum_filter(centre, size=3)
    if supersample <= 1 or not edge.any():
        return centre
    pts = grid.world_points(np.float64)[edge]
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    axes = grid.direction * np.asarray(grid.spacing_xyz)[None, :]
    acc = np.zeros(len(pts))
    for ox in offs:
        for oy in offs:
            for oz in offs:
                acc += phantom_values(ellipsoids, pts + axes @ np.array([ox, oy, oz]))
    out = centre.copy()
    out[edge] = acc / supersample ** 3
    return out


def write_demo_case(folder, case: DemoCase = FULL) -> Path:
    """Simulate the case and write it as an RTK case folder (with reference.nrrd); returns the folder."""
    from .formats.rtk import write_rtk_case

    scan, reference = simulate_phantom_scan(case)
    write_rtk_case(scan, folder, reference=reference)
    return Path(folder)


DEMO_TIME_LIMIT_S = 45.0
"""The demo's nerf run gets this wall-clock budget (its schedule is planned to end in time) unless
--iterations or --time-limit say otherwise: about a minute on two CPU cores, all told."""


def run_demo(out, device: str = "auto", method: str | None = None, preset: str = "preview",
             small: bool = False, iterations: int | None = None, quiet: bool = False,
             time_limit: float | None = None) -> ExitCode:
    """Simulate into OUT/data, reconstruct into OUT/run (replacing an earlier demo there), print the
    scores next to FDK's on the same scan."""
    import json
    import time

    from .worker import ReconstructOptions, default_method, run_reconstruction

    out = Path(out).absolute()
    case = SMALL if small else FULL
    method = method or default_method()
    if time_limit is None and iterations is None and method == "nerf" and not small:
        time_limit = DEMO_TIME_LIMIT_S
    if time_limit is not None and time_limit <= 0:
        time_limit = None
    if not quiet:
        print(f"simulating a {case.views}-view scan of a 3D Shepp-Logan phantom "
              f"({case.det}x{case.det} detector) into {out / 'data'}", flush=True)
    data = write_demo_case(out / "data", case)
    opts = ReconstructOptions(data=data, out=out / "run", reference=data / "reference.nrrd", reference_units="mu",
                              method=method, preset=preset, device=device, overwrite=True,
                              iterations=iterations, quiet=quiet, time_limit=time_limit)
    t0 = time.perf_counter()
    code = run_reconstruction(opts, stream=False)
    seconds = time.perf_counter() - t0
    if code != ExitCode.OK:
        return code
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    line = f"PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.3f}  {method} ({seconds:.0f} s)"
    if method != "fdk":
        fdk_scores = _fdk_scores(data, opts.device)
        if fdk_scores is not None:
            line += (f"   vs FDK on the same scan: PSNR {fdk_scores['psnr']:.2f} dB  SSIM {fdk_scores['ssim']:.3f} "
                     f"({fdk_scores['seconds']:.1f} s)")
    print(line)
    print(f"volume:  {out / 'run' / 'volume.nrrd'}")
    print(f"preview: {out / 'run' / 'preview.png'}")
    return code


def _fdk_scores(data: Path, device: str) -> dict | None:
    """FDK (Hann) on the demo scan, scored against its phantom like the main run: the baseline."""
    import time

    from .formats import load_scan
    from .metrics import score_volumes
    from .volume_io import read_volume
    from .worker import resolve_device

    try:
        from .fdk import FDKConfig, fdk
    except ImportError:
        return None
    scan = load_scan(data)
    reference = read_volume(data / "reference.nrrd")
    t0 = time.perf_counter()
    volume = fdk(scan, reference.grid, FDKConfig(filter="hann", clip_negative=True), device=resolve_device(device))
    seconds = time.perf_counter() - t0
    scores = score_volumes(reference, volume)
    return dict(psnr=float(scores["psnr"]), ssim=float(scores["ssim"]), seconds=seconds)
