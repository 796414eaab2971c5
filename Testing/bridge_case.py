"""The small RTK case of the Slicer tests: an ellipsoid body with one bright off-centre ellipsoid.

16 views of 32 x 32 pixels of exact line integrals on a 300/450 mm circular orbit (RTK frame, rotation
axis y), written with its voxelised phantom as reference.nrrd: the one case of test_slicer_bridge.py,
test_slicer_panel_bridge.py and test_slicer_views_rendered.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FEATURE_WORLD = np.array([22.0, -14.0, 10.0])
"""Centre of the bright ellipsoid in the scanner (RTK) frame, mm."""
FEATURE_RADII = (9.0, 11.0, 8.0)
BODY_RADII = (50.0, 50.0, 40.0)
BODY_MU, FEATURE_MU = 0.02, 0.04


def feature_ras() -> np.ndarray:
    """Where Slicer shows the feature: RAS = diag(-1, -1, 1) world (volume_nodes.RAS_FROM_WORLD)."""
    from CTNeRFReconLib.slicer_bridge.volume_nodes import world_to_ras

    return world_to_ras(FEATURE_WORLD)


def phantom():
    from CTNeRFReconLib.phantom import Ellipsoid

    return [Ellipsoid((0.0, 0.0, 0.0), BODY_RADII, BODY_MU),
            Ellipsoid(tuple(FEATURE_WORLD), FEATURE_RADII, FEATURE_MU)]


def write_case(folder: Path, views: int = 16, det: int = 32, pitch: float = 6.75) -> Path:
    """Write the RTK case (geometry.xml, projections.mha, reference.nrrd) into ``folder``."""
    from CTNeRFReconLib.data import ScanData, Volume
    from CTNeRFReconLib.formats.rtk import write_rtk_case
    from CTNeRFReconLib.fov import default_grid
    from CTNeRFReconLib.geometry import circular_geometry
    from CTNeRFReconLib.phantom import phantom_line_integrals, voxelize
    from CTNeRFReconLib.rays import all_pixel_indices, view_rays

    geometry = circular_geometry(300.0, 450.0, np.radians(np.arange(views) * 360.0 / views), (det, det),
                                 (pitch, pitch), axis="y")
    v, r, c = all_pixel_indices(geometry)
    rays = view_rays(geometry, v, r, c, np.full(3, -1000.0), np.full(3, 1000.0))
    p = phantom_line_integrals(phantom(), rays.origins.double().numpy(), rays.directions.double().numpy())
    scan = ScanData(p.reshape(views, det, det).astype(np.float32), geometry, "synthetic", "<bridge test phantom>")
    grid = default_grid(geometry)
    write_rtk_case(scan, folder, reference=Volume(voxelize(phantom(), grid, supersample=2), grid))
    return Path(folder)


def run_session(scene, case: Path, out: Path, method: str, timeout: float = 240, reference_node=None,
                options=None, **request):
    """A ReconstructionSession of the case on the CPU (preview preset), polled until it is done."""
    from CTNeRFReconLib.slicer_bridge.session import ReconstructionSession, SessionOptions
    from CTNeRFReconLib.slicer_bridge.worker import ReconstructRequest, WorkerConfig

    session = ReconstructionSession(
        scene, ReconstructRequest(data=case, out=out, method=method, device="cpu", preset="preview", **request),
        WorkerConfig(), options or SessionOptions(name="recon"), reference_node=reference_node).start()
    try:
        session.wait(timeout, interval=0.02)
    finally:
        if not session.state.done:
            session.stop(timeout=20)
    return session
