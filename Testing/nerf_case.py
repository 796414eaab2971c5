"""A tiny exact sparse-view case shared by the nerf tests: an ellipsoid phantom, analytic projections."""
from __future__ import annotations

import numpy as np

from CTNeRFReconLib.data import ScanData, Volume
from CTNeRFReconLib.geometry import VolumeGrid, circular_geometry
from CTNeRFReconLib.phantom import phantom_line_integrals, shepp_logan_3d, voxelize
from CTNeRFReconLib.rays import all_pixel_indices, view_rays


def small_phantom_case(views: int = 16, det: int = 48, n: int = 32, noise_i0: float = 0.0, seed: int = 0):
    """(scan, reference volume): Shepp-Logan-like phantom, RTK-frame orbit, exact line integrals."""
    voxel = 4.0
    grid = VolumeGrid.centered((n, n, n), (voxel,) * 3)
    phantom = shepp_logan_3d(scale_mm=0.45 * n * voxel)
    geo = circular_geometry(300.0, 450.0, np.radians(np.arange(views) * 360.0 / views), (det, det),
                            (1.5 * voxel * 450 / 300 * n / det,) * 2, axis="y")
    lo, hi = grid.bounds()
    v, r, c = all_pixel_indices(geo)
    rays = view_rays(geo, v, r, c, lo - 50, hi + 50)
    p = phantom_line_integrals(phantom, rays.origins.double().numpy(), rays.directions.double().numpy())
    p = p.reshape(views, det, det)
    if noise_i0 > 0:
        counts = np.random.default_rng(seed).poisson(noise_i0 * np.exp(-p)).clip(1, None)
        p = -np.log(counts / noise_i0)
    scan = ScanData(p.astype(np.float32), geo, "synthetic", "<small phantom>")
    return scan, Volume(voxelize(phantom, grid, supersample=2), grid)
