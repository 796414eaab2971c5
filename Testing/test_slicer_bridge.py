"""The MRML bridge on slicer-core's real vtkMRMLScene, driving a real engine subprocess.

A tiny scan of an ellipsoid phantom with one bright off-centre ellipsoid is written as an RTK case
(exact line integrals); the engine reconstructs it in a worker process and the session streams it
into the scene. Checked: the output node is one node updated in place (several times with nerf),
no observer ever sees a torn or misplaced volume, the bright feature lands at RAS = diag(-1,-1,1)
world, Slicer's own NRRD reader gives the same IJKToRAS as the bridge, the comparison matches
numpy, cancel ends the whole process tree and keeps the last volume, and bad input leaves no node.
Also: the loss table (the chart's data) grows while the run goes, a run can be made on the
reference's own grid, closing the scene or the Python that started a worker stops it, and the
comparison layers of the slice views are linked with one opacity.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core package (a real vtkMRMLScene) is not installed")

from CTNeRFReconLib.data import Volume  # noqa: E402
from CTNeRFReconLib.events import ExitCode  # noqa: E402
from CTNeRFReconLib.geometry import VolumeGrid  # noqa: E402
from CTNeRFReconLib.methods import method_names  # noqa: E402
from CTNeRFReconLib.phantom import voxelize  # noqa: E402
from CTNeRFReconLib.slicer_bridge import tables, views  # noqa: E402
from CTNeRFReconLib.slicer_bridge import volume_nodes as vn  # noqa: E402
from CTNeRFReconLib.slicer_bridge.compare import compare_nodes  # noqa: E402
from CTNeRFReconLib.slicer_bridge.projections import create_projection_node, describe_scan  # noqa: E402
from CTNeRFReconLib.slicer_bridge.session import (  # noqa: E402
    REFERENCE_FILE, ReconstructionSession, SessionOptions, SessionState, grid_request_fields, method_extra_args)
from CTNeRFReconLib.slicer_bridge.worker import ReconstructRequest, WorkerConfig  # noqa: E402

from bridge_case import BODY_MU, FEATURE_MU, FEATURE_WORLD, phantom, write_case  # noqa: E402  (one case for all)


def _methods() -> list[str]:
    try:
        return method_names()
    except ImportError:  # a method module is still being written
        return []


def _have(method: str) -> bool:
    return method in _methods()


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    """An RTK case (geometry.xml, projections.mha, reference.nrrd) of the phantom: 16 views, 32 x 32."""
    return write_case(tmp_path_factory.mktemp("bridge_case"))


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
                reference_node=None, options: SessionOptions | None = None, on_poll=None, output_node=None,
                **request) -> ReconstructionSession:
    session = ReconstructionSession(
        scene, ReconstructRequest(data=case, out=out, method=method, device="cpu", preset="preview", **request),
        WorkerConfig(), options or SessionOptions(name="recon"), reference_node=reference_node,
        output_node=output_node).start()
    deadline = time.monotonic() + timeout
    try:
        while not session.state.done and time.monotonic() < deadline:
            session.poll()
            if watcher is not None and session.output_node is not None:
                watcher.attach(session.output_node)
            if on_poll is not None:
                on_poll(session)
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


def test_scan_description_names_format_views_detector_angles_and_distances(case):
    from CTNeRFReconLib.formats import load_scan

    text = describe_scan(load_scan(case))
    assert text.startswith("rtk: 16 views"), text
    assert "detector 32 x 32 pixels of 6.75 mm" in text
    assert "angles 0-337.5 deg" in text
    assert "source-isocentre 300 mm" in text and "source-detector 450 mm" in text


def test_comparison_layers_are_linked_with_one_opacity(scene):
    grid = VolumeGrid.centered((4, 4, 4), (1.0, 1.0, 1.0))
    recon = vn.create_volume_node(scene, Volume(np.zeros(grid.shape_zyx, np.float32), grid), "recon")
    reference = vn.create_volume_node(scene, Volume(np.ones(grid.shape_zyx, np.float32), grid), "reference")
    assert views.show_layers(scene, recon, reference) == 0  # no slice views: nothing to set, no error
    composites = []
    for name in ("Red", "Yellow", "Green"):
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        composites.append(composite)
    assert views.show_layers(scene, recon, reference, opacity=0.3) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == recon.GetID()
        assert composite.GetForegroundVolumeID() == reference.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.3)
        assert composite.GetLinkedControl()
    views.set_overlay_opacity(scene, views.flicked(0.3))  # flick: the overlay alone
    assert [c.GetForegroundOpacity() for c in composites] == [1.0, 1.0, 1.0]
    views.set_overlay_opacity(scene, views.flicked(1.0))  # and back: the reconstruction alone
    assert [c.GetForegroundOpacity() for c in composites] == [0.0, 0.0, 0.0]
    views.show_layers(scene, recon, None, opacity=0.0)
    assert all(c.GetForegroundVolumeID() is None for c in composites)
    with pytest.raises(ValueError, match="opacity"):
        views.set_overlay_opacity(scene, 1.5)
    with pytest.raises(ValueError, match="no reconstruction"):
        views.show_layers(scene, None, reference)


def test_output_grid_choices_map_to_the_engines_options():
    assert grid_request_fields("auto", 2.0, (8, 8, 8)) == {"grid_spacing": None, "grid_size": None}
    assert grid_request_fields("reference") == {"grid_spacing": None, "grid_size": None}
    assert grid_request_fields("custom", 1.5) == {"grid_spacing": 1.5, "grid_size": None}
    assert grid_request_fields("custom", 0, (64, 32, 16)) == {"grid_spacing": None, "grid_size": (64, 32, 16)}
    assert grid_request_fields("custom", 2.0, (8, 9, 10)) == {"grid_spacing": 2.0, "grid_size": (8, 9, 10)}
    request = ReconstructRequest(data=Path("d"), out=Path("o"), **grid_request_fields("custom", 2.0, (8, 9, 10)))
    args = request.to_args()
    assert args[args.index("--grid-size") + 1:args.index("--grid-size") + 4] == ["8", "9", "10"]
    assert args[args.index("--grid-spacing") + 1] == "2.0"
    for bad in [("custom", 0.0, (0, 0, 0)), ("custom", 1.0, (8, 0, 8)), ("custom", -1.0, (0, 0, 0)),
                ("cube", 1.0, (0, 0, 0))]:
        with pytest.raises(ValueError):
            grid_request_fields(*bad)


def test_the_panels_nerf_options_reach_the_engines_configuration():
    """The time limit and "Table beyond the view" become the command line's arguments, which the real
    parser and the worker's settings turn into the nerf configuration; FDK gets neither."""
    from CTNeRFReconLib.cli import build_parser
    from CTNeRFReconLib.nerf.config import NerfConfig
    from CTNeRFReconLib.worker import parse_setting_overrides

    assert method_extra_args("fdk", 60, True) == [] and method_extra_args("nerf") == []
    extra = method_extra_args("nerf", 90, True)
    args = build_parser().parse_args(ReconstructRequest(data=Path("d"), out=Path("o"), extra_args=extra).to_args())
    assert args.time_limit == 90.0
    cfg = NerfConfig.from_settings(parse_setting_overrides(args.setting))
    assert cfg.widen_reached_sides and cfg.extend_cut_sides and cfg.measure_thin_sides
    assert not NerfConfig.from_settings(parse_setting_overrides([])).widen_reached_sides


def test_grid_from_a_missing_reference_is_refused_before_any_process(scene, case, tmp_path):
    before = _user_nodes(scene)
    session = ReconstructionSession(scene, ReconstructRequest(data=case, out=tmp_path / "run", device="cpu"),
                                    WorkerConfig(), SessionOptions(grid_from_reference=True))
    with pytest.raises(ValueError, match="reference"):
        session.start()
    assert session.worker is None and session.state is SessionState.NOT_STARTED
    assert _user_nodes(scene) == before


# -------------------------------------------------------------------------------- real worker

@pytest.mark.skipif(not _have("fdk"), reason="the engine's fdk method (CTNeRFReconLib/fdk.py) is not there yet")
def test_an_output_node_given_empty_counts_as_the_runs_volume_only_once_filled(scene, case, tmp_path):
    """The output selector's "Create new Volume" hands the panel a node with neither voxels nor display node
    (Slicer's qMRMLNodeFactory adds the bare node), and a second Start hands it the last run's node. The
    panel fits the views and turns on volume rendering when `has_run_volume` says so: never for the empty
    node or the old volume, and from the first volume of this run on, filled and displayable."""
    given = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "made by the selector")
    assert given.GetImageData() is None and given.GetDisplayNode() is None
    seen = []

    def look(session):
        seen.append((session.has_run_volume, session.volumes_applied, given.GetImageData() is not None,
                     given.GetDisplayNode() is not None))

    first = run_session(scene, case, tmp_path / "first", "fdk", output_node=given, on_poll=look)
    assert first.state is SessionState.FINISHED, first.message
    assert seen and seen[0][0] is False  # the first poll comes before the engine has written a volume
    for ready, applied, voxels, display in seen:
        assert ready == (applied > 0) and (not ready or (voxels and display)), (ready, applied, voxels, display)
    assert first.has_run_volume and first.output_node is given
    assert [n.GetID() for n in _volume_nodes(scene)] == [given.GetID()]

    again = ReconstructionSession(scene, ReconstructRequest(data=case, out=tmp_path / "again", method="fdk",
                                                            device="cpu"),
                                  WorkerConfig(), SessionOptions(name="recon"), output_node=given)
    assert given.GetImageData() is not None and not again.has_run_volume  # the last run's volume


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


@pytest.mark.skipif(not _have("fdk"), reason="the engine's fdk method (CTNeRFReconLib/fdk.py) is not there yet")
def test_a_run_on_the_reference_grid_lands_on_the_reference_node(scene, case, tmp_path):
    """Output grid = the reference node's (an HU CT on its own oblique-free, off-centre grid)."""
    grid = VolumeGrid((30, 26, 22), (3.5, 3.0, 3.2), (-48.0, -40.0, -30.0))
    mu = voxelize(phantom(), grid, supersample=2).astype(np.float32)
    hu = vn.mu_to_units(mu, "hu")  # a CT as loaded from a file: HU values, no bridge attributes
    reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    reference.CreateDefaultDisplayNodes()
    vn.update_volume_node(reference, Volume(hu, grid))
    for name in (vn.ATTR_UNITS, vn.ATTR_MU_WATER):
        reference.RemoveAttribute(name)
    session = run_session(scene, case, tmp_path / "run", "fdk", reference_node=reference,
                          options=SessionOptions(name="recon", grid_from_reference=True))
    assert session.state is SessionState.FINISHED, session.message
    assert session.started_info["grid"]["source"] == "reference"
    written = vn.load_volume_file(tmp_path / "run" / REFERENCE_FILE)
    np.testing.assert_allclose(written.array, mu, atol=1e-6)  # HU read back as 1/mm for the engine
    node = session.output_node
    assert node.GetImageData().GetDimensions() == (30, 26, 22)
    np.testing.assert_allclose(vn.node_ijk_to_ras(node), vn.node_ijk_to_ras(reference), atol=1e-9)
    rows = tables.read_key_value_table(session.metrics_table_node)
    assert float(rows["psnr"]) == pytest.approx(float(rows["engine.psnr"]), abs=1e-3)  # both on one grid
    np.testing.assert_allclose(vn.array_from_node(session.difference_node), vn.array_from_node(node) - mu,
                               atol=1e-6)


@pytest.mark.skipif(not _have("fdk"), reason="the engine's fdk method (CTNeRFReconLib/fdk.py) is not there yet")
def test_a_cancel_before_the_engine_started_is_a_cancel(scene, case, tmp_path):
    """Cancel at once (the worker may still be importing, or about to remove a stale cancel file)."""
    before = _user_nodes(scene)
    session = ReconstructionSession(
        scene, ReconstructRequest(data=case, out=tmp_path / "run", method="fdk", device="cpu", preset="preview"),
        WorkerConfig(), SessionOptions(name="recon")).start()
    session.cancel()
    assert session.wait(120) is SessionState.CANCELLED, session.message
    assert session.worker.wait(30) is not None and session.failure_kind is None
    if session.volumes_applied == 0:
        assert _user_nodes(scene) == before


@pytest.mark.slow
@pytest.mark.skipif(not _have("nerf"), reason="the engine's nerf method is not available yet")
def test_nerf_streams_several_snapshots_into_one_node(scene, case, tmp_path):
    watcher = NodeWatcher()
    rows_seen = []  # loss table rows after each poll while the run goes: the chart's data, live

    def count_rows(session):
        if session.loss_table_node is not None and not session.state.done:
            rows_seen.append(session.loss_table_node.GetTable().GetNumberOfRows())

    session = run_session(scene, case, tmp_path / "run", "nerf", watcher=watcher, iterations=6, snapshot_every=2,
                          on_poll=count_rows, extra_args=["--progress-every", "1"])
    assert session.state is SessionState.FINISHED, session.message
    assert len(set(rows_seen)) >= 2 and rows_seen == sorted(rows_seen), rows_seen
    series = scene.GetNodeByID(session.chart_node.GetNthPlotSeriesNodeID(0))
    assert series.GetTableNodeID() == session.loss_table_node.GetID()
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


def _long_nerf_request(case: Path, out: Path) -> ReconstructRequest:
    return ReconstructRequest(data=case, out=out, method="nerf", device="cpu", preset="preview", iterations=100000,
                              snapshot_every=0)


@pytest.mark.slow
@pytest.mark.skipif(not _have("nerf"), reason="the engine's nerf method is not available yet")
def test_closing_the_scene_stops_the_worker(scene, case, tmp_path):
    import psutil

    # a generous close timeout: on a loaded machine the engine's set-up before its first cancel check
    # can take longer than the default's 15 s, and this test is about the clean stop, not the kill
    session = ReconstructionSession(scene, _long_nerf_request(case, tmp_path / "run"), WorkerConfig(),
                                    SessionOptions(name="recon", close_timeout_s=120)).start()
    deadline = time.monotonic() + 180
    while session.started_info is None and not session.state.done and time.monotonic() < deadline:
        session.poll()
        time.sleep(0.05)
    assert session.started_info is not None, session.message
    pid = session.worker.pid
    scene.Clear(0)  # File > Close Scene: StartCloseEvent, then every node goes
    assert session.state is SessionState.CANCELLED and "scene was closed" in session.message
    assert session.worker.exit_code == ExitCode.OK and not session.worker.killed  # stopped cleanly
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert session.output_node is None and session.created_nodes == []
    assert any(e["event"] == "finished" and e["cancelled"] for e in session.events)
    assert (tmp_path / "run" / "volume.nrrd").exists()  # the run folder keeps the last volume
    scene.Clear(0)  # the session no longer observes the scene


@pytest.mark.slow
@pytest.mark.skipif(not _have("nerf"), reason="the engine's nerf method is not available yet")
def test_a_worker_is_stopped_when_the_python_that_started_it_exits(case, tmp_path):
    """Closing Slicer: the interpreter's exit stops its running workers (atexit), cleanly."""
    import json
    import subprocess
    import sys

    import psutil

    out = tmp_path / "run"
    script = f"""
import json, sys, time
from pathlib import Path
from CTNeRFReconLib.slicer_bridge.worker import ReconstructRequest, WorkerConfig, WorkerProcess
request = ReconstructRequest(data=Path({str(case)!r}), out=Path({str(out)!r}), method="nerf", device="cpu",
                             preset="preview", iterations=100000, snapshot_every=0)
worker = WorkerProcess.reconstruct(request, WorkerConfig(exit_timeout_s=120)).start()
deadline = time.monotonic() + 180
while time.monotonic() < deadline and not any(e["event"] == "started" for e in worker.poll()):
    time.sleep(0.05)
print(json.dumps({{"pid": worker.pid}}), flush=True)
"""  # ends without stopping its worker
    from CTNeRFReconLib.slicer_bridge.worker import worker_environment

    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                           env=worker_environment())
    assert child.returncode == 0, child.stderr
    pid = json.loads(child.stdout.strip().splitlines()[-1])["pid"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "finished" and events[-1]["cancelled"] is True
    assert (out / "volume.nrrd").exists()


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


def test_the_engines_interpreter_is_asked_which_packages_it_lacks(tmp_path):
    """How the panel finds out what to offer to install, for Slicer's Python or an external one."""
    import sys

    from CTNeRFReconLib.slicer_bridge.worker import missing_modules

    config = WorkerConfig(interpreter=sys.executable)
    assert missing_modules(config, ["json", "CTNeRFReconLib", "no_such_module_xyz"]) == ["no_such_module_xyz"]
    with pytest.raises(ValueError, match="interpreter"):
        missing_modules(WorkerConfig(interpreter=str(tmp_path / "no-python")), ["json"])
    not_python = tmp_path / "not-python"
    not_python.write_text("#!/bin/sh\necho nonsense\n")
    not_python.chmod(0o755)
    with pytest.raises(ValueError, match="could not ask"):
        missing_modules(WorkerConfig(interpreter=str(not_python)), ["json"])


def test_a_missing_interpreter_is_refused_before_starting(scene, tmp_path):
    with pytest.raises(ValueError, match="interpreter"):
        ReconstructionSession(scene, ReconstructRequest(data=tmp_path, out=tmp_path / "run"),
                              WorkerConfig(interpreter=str(tmp_path / "no-python"))).start()
