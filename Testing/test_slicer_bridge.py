"""The MRML bridge on slicer-core's real vtkMRMLScene, driving a real engine subprocess.

A tiny scan of an ellipsoid phantom with one bright off-centre ellipsoid is written as an RTK case
(exact line integrals); the engine reconstructs it in a worker process and the session streams it
into the scene. Checked: the output node is one node updated in place (several times with nerf),
no observer ever sees a torn or misplaced volume, the bright feature lands at RAS = diag(-1,-1,1)
world, Slicer's own NRRD reader gives the same IJKToRAS as the bridge, the comparison matches
numpy, cancel ends the whole process tree and keeps the last volume, and bad input leaves no node.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core package (a real vtkMRMLScene) is not installed")

from CTNeRFReconLib.data import ScanData, Volume  # noqa: E402
from CTNeRFReconLib.events import ExitCode  # noqa: E402
from CTNeRFReconLib.fov import default_grid  # noqa: E402
from CTNeRFReconLib.geometry import VolumeGrid, circular_geometry  # noqa: E402
from CTNeRFReconLib.methods import method_names  # noqa: E402
from CTNeRFReconLib.phantom import Ellipsoid, phantom_line_integrals, voxelize  # noqa: E402
from CTNeRFReconLib.rays import all_pixel_indices, view_rays  # noqa: E402
from CTNeRFReconLib.slicer_bridge import tables  # noqa: E402
from CTNeRFReconLib.slicer_bridge import volume_nodes as vn  # noqa: E402
from CTNeRFReconLib.slicer_bridge.compare import compare_nodes  # noqa: E402
from CTNeRFReconLib.slicer_bridge.projections import create_projection_node  # noqa: E402
from CTNeRFReconLib.slicer_bridge.session import ReconstructionSession, SessionOptions, SessionState  # noqa: E402
from CTNeRFReconLib.slicer_bridge.worker import ReconstructRequest, WorkerConfig  # noqa: E402

FEATURE_WORLD = np.array([22.0, -14.0, 10.0])
"""Centre of the bright ellipsoid in the scanner (RTK) frame, mm."""
BODY_MU, FEATURE_MU = 0.02, 0.04


def _methods() -> list[str]:
    try:
        return method_names()
    except ImportError:  # a method module is still being written
        return []


def _have(method: str) -> bool:
    return method in _methods()


def phantom():
    return [Ellipsoid((0.0, 0.0, 0.0), (50.0, 50.0, 40.0), BODY_MU),
            Ellipsoid(tuple(FEATURE_WORLD), (9.0, 11.0, 8.0), FEATURE_MU)]


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    """An RTK case (geometry.xml, projections.mha, reference.nrrd) of the phantom: 16 views, 32 x 32."""
    from CTNeRFReconLib.formats.rtk import write_rtk_case

    folder = tmp_path_factory.mktemp("bridge_case")
    views, det = 16, 32
    geometry = circular_geometry(300.0, 450.0, np.radians(np.arange(views) * 360.0 / views), (det, det),
                                 (6.75, 6.75), axis="y")
    v, r, c = all_pixel_indices(geometry)
    rays = view_rays(geometry, v, r, c, np.full(3, -1000.0), np.full(3, 1000.0))
    p = phantom_line_integrals(phantom(), rays.origins.double().numpy(), rays.directions.double().numpy())
    scan = ScanData(p.reshape(views, det, det).astype(np.float32), geometry, "synthetic", "<bridge test phantom>")
    grid = default_grid(geometry)
    write_rtk_case(scan, folder, reference=Volume(voxelize(phantom(), grid, supersample=2), grid))
    return folder


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def _volume_nodes(scene) -> list:
    return [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]


def _user_nodes(scene) -> set[str]:
    """IDs of the data nodes a run may create (volumes, tables, plots)."""
    ids = set()
    for cls in ("vtkMRMLScalarVolumeNode", "vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode",
                "vtkMRMLScalarVolumeDisplayNode"):
        ids |= {scene.GetNthNodeByClass(i, cls).GetID() for i in range(scene.GetNumberOfNodesByClass(cls))}
    return ids


class NodeWatcher:
    """Records what observers of the output node see at each ModifiedEvent (voxels and geometry)."""

    def __init__(self):
        self.states: list[tuple[np.ndarray, np.ndarray]] = []
        self.node = None

    def attach(self, node):
        if self.node is None:
            self.node = node
            node.AddObserver("ModifiedEvent", self._seen)
            self._seen(node, None)

    def _seen(self, node, event):
        if node.GetImageData() is not None:
            self.states.append((vn.array_from_node(node), vn.node_ijk_to_ras(node)))


def run_session(scene, case: Path, out: Path, method: str, timeout: float = 240, watcher: NodeWatcher | None = None,
                reference_node=None, **request) -> ReconstructionSession:
    session = ReconstructionSession(
        scene, ReconstructRequest(data=case, out=out, method=method, device="cpu", preset="preview", **request),
        WorkerConfig(), SessionOptions(name="recon"), reference_node=reference_node).start()
    deadline = time.monotonic() + timeout
    try:
        while not session.state.done and time.monotonic() < deadline:
            session.poll()
            if watcher is not None and session.output_node is not None:
                watcher.attach(session.output_node)
            time.sleep(0.02)
    finally:
        if not session.state.done:
            session.stop(timeout=20)
    return session


# -------------------------------------------------------------------------------- no worker

def test_node_geometry_is_what_slicer_reads_from_the_volume_file(scene, tmp_path):
    """The bridge's IJKToRAS = Slicer's NRRD reader's (LPS file -> RAS), for an oblique grid too."""
    from CTNeRFReconLib.volume_io import write_volume

    angle = np.radians(20)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    grid = VolumeGrid((5, 6, 7), (1.5, 2.0, 2.5), (12.0, -30.0, 4.0), direction)
    array = np.random.default_rng(0).random(grid.shape_zyx, dtype=np.float32)
    path = write_volume(Volume(array, grid), tmp_path / "v.nrrd")

    ours = vn.create_volume_node(scene, vn.load_volume_file(path), "ours")
    theirs = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "slicer")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(theirs)
    np.testing.assert_allclose(vn.node_ijk_to_ras(ours), vn.node_ijk_to_ras(theirs), atol=1e-9)
    np.testing.assert_array_equal(vn.array_from_node(ours), vn.array_from_node(theirs))
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid.index_to_world_matrix()
    np.testing.assert_allclose(vn.node_ijk_to_ras(ours), expected, atol=1e-12)
    back = vn.grid_from_node(theirs)
    np.testing.assert_allclose(back.origin_xyz, grid.origin_xyz, atol=1e-9)
    np.testing.assert_allclose(back.direction, direction, atol=1e-9)


def test_hu_display_and_ct_windows(scene):
    grid = VolumeGrid.centered((4, 4, 4), (1.0, 1.0, 1.0))
    mu = np.full(grid.shape_zyx, 0.02, dtype=np.float32)
    mu[0] = 0.0
    node = vn.create_volume_node(scene, Volume(mu, grid), "hu", units="hu", window="soft_tissue")
    shown = vn.array_from_node(node)
    assert shown[0].max() == pytest.approx(-1000.0) and shown[1:].min() == pytest.approx(0.0, abs=1e-3)
    np.testing.assert_allclose(vn.volume_from_node(node).array, mu, atol=1e-7)  # back to 1/mm
    display = node.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((400.0, 40.0))
    mu_node = vn.create_volume_node(scene, Volume(mu, grid), "mu", window="soft_tissue")
    d = mu_node.GetDisplayNode()  # the same window in 1/mm: W 400 HU = 0.008, L 40 HU = 0.0208
    assert (d.GetWindow(), d.GetLevel()) == pytest.approx((0.008, 0.0208))
    vn.update_volume_node(mu_node, Volume(mu * 3, grid))  # a new volume keeps the user's window
    assert (d.GetWindow(), d.GetLevel()) == pytest.approx((0.008, 0.0208))
    assert vn.update_count(mu_node) == 2 and scene.GetNodeByID(mu_node.GetID()) is mu_node


def test_projection_stack_node_scrolls_through_views(scene, case):
    from CTNeRFReconLib.formats import load_scan

    scan = load_scan(case)
    node = create_projection_node(scene, scan)
    assert node.GetImageData().GetDimensions() == (32, 32, scan.n_views)
    np.testing.assert_allclose(vn.array_from_node(node)[5], scan.projections[5])
    m = vn.node_ijk_to_ras(node)
    assert m[0, 0] < 0 and m[1, 1] < 0 and m[2, 2] == 1.0  # columns to screen right, rows down, views along S


# -------------------------------------------------------------------------------- real worker

@pytest.mark.skipif(not _have("fdk"), reason="the engine's fdk method (CTNeRFReconLib/fdk.py) is not there yet")
def test_fdk_run_lands_the_feature_at_its_ras_point_and_compares_like_numpy(scene, case, tmp_path):
    reference = vn.create_volume_node(scene, vn.load_volume_file(case / "reference.nrrd"), "reference")
    watcher = NodeWatcher()
    session = run_session(scene, case, tmp_path / "run", "fdk", watcher=watcher, reference_node=reference)
    assert session.state is SessionState.FINISHED, session.message
    node = session.output_node
    assert node is not None and session.volumes_applied >= 1
    assert [n.GetID() for n in _volume_nodes(scene)].count(node.GetID()) == 1

    # the node holds exactly the run's volume.nrrd, at the geometry Slicer would give it
    final = vn.load_volume_file(tmp_path / "run" / "volume.nrrd")
    np.testing.assert_array_equal(vn.array_from_node(node), final.array)
    np.testing.assert_allclose(vn.node_ijk_to_ras(node), vn.ijk_to_ras(final.grid), atol=1e-9)

    # the bright off-centre ellipsoid lands at RAS = diag(-1, -1, 1) world, within a voxel
    array = vn.array_from_node(node)
    k, j, i = np.nonzero(array > (BODY_MU + FEATURE_MU / 2))
    assert len(i) > 10
    ijk = np.stack([i, j, k, np.ones_like(i)]).astype(float)
    centroid_ras = (vn.node_ijk_to_ras(node) @ ijk)[:3].mean(axis=1)
    expected = np.array([-FEATURE_WORLD[0], -FEATURE_WORLD[1], FEATURE_WORLD[2]])
    assert np.linalg.norm(centroid_ras - expected) < max(final.grid.spacing_xyz), (centroid_ras, expected)

    # observers only ever saw complete volumes on the run's grid
    assert watcher.states
    for seen, ijk_to_ras in watcher.states:
        assert seen.shape == final.grid.shape_zyx and np.all(np.isfinite(seen))
        np.testing.assert_allclose(ijk_to_ras, vn.ijk_to_ras(final.grid), atol=1e-9)

    # comparison: the difference node is recon - reference (same grid) and PSNR is numpy's
    ref = vn.load_volume_file(case / "reference.nrrd").array
    diff = session.difference_node
    assert diff is not None
    np.testing.assert_allclose(vn.array_from_node(diff), final.array - ref, atol=1e-6)
    np.testing.assert_allclose(vn.node_ijk_to_ras(diff), vn.node_ijk_to_ras(node))
    rows = tables.read_key_value_table(session.metrics_table_node)
    mse = np.mean((final.array.astype(np.float64) - ref) ** 2)
    assert float(rows["psnr"]) == pytest.approx(10 * math.log10(ref.max() ** 2 / mse), abs=0.05)
    assert rows["reference"] == "reference"

    # compare_nodes on its own: a reference on another grid is resampled by world position
    shifted = VolumeGrid(final.grid.shape_xyz, final.grid.spacing_xyz,
                         tuple(np.add(final.grid.origin_xyz, final.grid.spacing_xyz[0])))
    moved = vn.create_volume_node(scene, Volume(voxelize(phantom(), shifted, 2), shifted), "moved reference")
    result, diff2, table2 = compare_nodes(scene, moved, node)
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(result.reference_on_grid.array[inner], ref[inner], atol=0.011)
    assert tables.read_key_value_table(table2)["reference"] == "moved reference"


@pytest.mark.slow
@pytest.mark.skipif(not _have("nerf"), reason="the engine's nerf method is not available yet")
def test_nerf_streams_several_snapshots_into_one_node(scene, case, tmp_path):
    watcher = NodeWatcher()
    session = run_session(scene, case, tmp_path / "run", "nerf", watcher=watcher, iterations=6, snapshot_every=2)
    assert session.state is SessionState.FINISHED, session.message
    snapshots = [e for e in session.events if e["event"] == "snapshot"]
    assert len(snapshots) >= 2
    assert session.volumes_applied >= 2 and vn.update_count(session.output_node) == session.volumes_applied
    assert len(_volume_nodes(scene)) == 1
    distinct = {hash(seen.tobytes()) for seen, _ in watcher.states}
    assert len(distinct) >= 2, "the node never changed between snapshots"
    grid = vn.load_volume_file(tmp_path / "run" / "volume.nrrd").grid
    for seen, ijk_to_ras in watcher.states:
        assert seen.shape == grid.shape_zyx and np.all(np.isfinite(seen))
        np.testing.assert_allclose(ijk_to_ras, vn.ijk_to_ras(grid), atol=1e-9)
    losses = tables.table_column(session.loss_table_node, "loss")
    assert len(losses) >= 1 and all(np.isfinite(losses))
    assert session.chart_node.GetNumberOfPlotSeriesNodes() == 1


@pytest.mark.slow
@pytest.mark.skipif(not _have("nerf"), reason="the engine's nerf method is not available yet")
def test_cancel_ends_the_process_tree_and_keeps_the_last_volume(scene, case, tmp_path):
    import psutil

    session = ReconstructionSession(
        scene, ReconstructRequest(data=case, out=tmp_path / "run", method="nerf", device="cpu", preset="preview",
                                  iterations=100000, snapshot_every=2),
        WorkerConfig(cancel_grace_s=60), SessionOptions(name="recon")).start()
    deadline = time.monotonic() + 180
    while session.volumes_applied == 0 and not session.state.done and time.monotonic() < deadline:
        session.poll()
        time.sleep(0.05)
    assert session.volumes_applied >= 1, session.message
    pids = [session.worker.pid] + [p.pid for p in session.worker.descendants()]
    session.cancel()
    assert session.state is SessionState.CANCELLING
    assert session.wait(120) is SessionState.CANCELLED, session.message
    assert session.worker.wait(30) == ExitCode.OK and not session.worker.killed
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive
    assert session.finished_info["cancelled"] is True
    final = vn.load_volume_file(tmp_path / "run" / "volume.nrrd")
    np.testing.assert_array_equal(vn.array_from_node(session.output_node), final.array)
    assert tables.read_key_value_table(session.metrics_table_node)["state"] == "cancelled"


@pytest.mark.slow
@pytest.mark.skipif(not _have("nerf"), reason="the engine's nerf method is not available yet")
def test_a_crashed_worker_is_reported_and_its_half_made_nodes_removed(scene, case, tmp_path):
    """The process tree killed mid-run (before any volume): a synthetic failure, no nodes left."""
    before = _user_nodes(scene)
    session = ReconstructionSession(
        scene, ReconstructRequest(data=case, out=tmp_path / "run", method="nerf", device="cpu", preset="preview",
                                  iterations=100000, snapshot_every=0, extra_args=["--progress-every", "2"]),
        WorkerConfig(), SessionOptions(name="recon")).start()
    deadline = time.monotonic() + 180
    while session.loss_table_node is None and not session.state.done and time.monotonic() < deadline:
        session.poll()
        time.sleep(0.05)
    assert session.loss_table_node is not None and session.volumes_applied == 0, session.message
    assert _user_nodes(scene) != before
    session.worker.kill_tree()
    assert session.wait(30) is SessionState.FAILED
    assert "killed" in session.message or "signal" in session.message
    assert _user_nodes(scene) == before


def test_bad_input_fails_cleanly_without_nodes(scene, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a scan")
    before = _user_nodes(scene)
    session = ReconstructionSession(scene, ReconstructRequest(data=junk, out=tmp_path / "run", device="cpu"),
                                    WorkerConfig(), SessionOptions(name="recon")).start()
    assert session.wait(120) is SessionState.FAILED
    assert session.failure_kind == "bad_input", session.message
    assert str(junk) in session.message
    assert session.worker.wait(30) == ExitCode.BAD_INPUT
    assert session.output_node is None and _user_nodes(scene) == before
    assert not (tmp_path / "run" / "volume.nrrd").exists()


def test_a_missing_interpreter_is_refused_before_starting(scene, tmp_path):
    with pytest.raises(ValueError, match="interpreter"):
        ReconstructionSession(scene, ReconstructRequest(data=tmp_path, out=tmp_path / "run"),
                              WorkerConfig(interpreter=str(tmp_path / "no-python"))).start()
