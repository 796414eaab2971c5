"""What the panel adds on top of the bridge, on slicer-core's real scene and a real engine process.

The module file needs the Slicer application (Qt, CTK), so its widget is checked statically in
test_module_static.py; everything it does to the scene goes through these bridge functions, tested
here: the layouts (slices + 3D + chart, side by side), the log, the snapshots kept as a Sequence,
opening an earlier run folder and resuming it, ending a run after an error on this side, and the
library's import without PyYAML (Slicer's own Python has none).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core package (a real vtkMRMLScene) is not installed")

from CTNeRFReconLib.slicer_bridge import layouts  # noqa: E402
from CTNeRFReconLib.slicer_bridge import volume_nodes as vn  # noqa: E402
from CTNeRFReconLib.slicer_bridge.session import (  # noqa: E402
    ReconstructionSession, SessionOptions, SessionState, bad_view_advice, open_run, parse_view_list)
from CTNeRFReconLib.slicer_bridge.worker import ReconstructRequest, WorkerConfig  # noqa: E402

from test_slicer_bridge import case, run_session  # noqa: E402,F401  (the tiny RTK case fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    s.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())  # Slicer's Sequences module registers it
    default_slice = slicer.vtkMRMLSliceNode()  # as the application does: slice nodes know Axial, Sagittal...
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(s)
    s.AddDefaultNode(default_slice)
    return s


def _slice_view(scene, layout_name: str):
    """A slice node and its composite node, as Slicer's layout manager makes them for a view."""
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    node.SetLayoutName(layout_name)
    node.SetOrientation("Axial")
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    composite.SetLayoutName(layout_name)
    return composite


def test_the_module_layouts_are_registered_and_hold_3d_chart_and_slices(scene):
    layouts.select_layout(scene, layouts.MONITOR_LAYOUT_ID)
    layout_node = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layout_node.GetViewArrangement() == layouts.MONITOR_LAYOUT_ID
    xml = layout_node.GetLayoutDescription(layouts.MONITOR_LAYOUT_ID)
    # Slicer's ShowChartInLayout picks Four-Up Plot, which has no 3D view: this one has all five views
    for view in ('class="vtkMRMLViewNode"', 'class="vtkMRMLPlotViewNode"', 'singletontag="Red"',
                 'singletontag="Yellow"', 'singletontag="Green"'):
        assert view in xml
    side = layout_node.GetLayoutDescription(layouts.SIDE_BY_SIDE_LAYOUT_ID)
    assert all(f'singletontag="{name}"' in side for name in layouts.SIDE_BY_SIDE_VIEWS)
    # the layout logic parses both descriptions into view nodes, as the application does
    logic = slicer.vtkMRMLLayoutLogic()
    logic.SetMRMLScene(scene)
    layout_node.SetViewArrangement(layouts.SIDE_BY_SIDE_LAYOUT_ID)
    names = {scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetLayoutName()
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))}
    assert set(layouts.SIDE_BY_SIDE_VIEWS) <= names, names
    layout_node.SetViewArrangement(layouts.MONITOR_LAYOUT_ID)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotViewNode") >= 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLViewNode") >= 1


def _view_classes(scene) -> dict[str, int]:
    return {cls: scene.GetNumberOfNodesByClass(cls)
            for cls in ("vtkMRMLViewNode", "vtkMRMLPlotViewNode", "vtkMRMLTableViewNode", "vtkMRMLSliceNode")}


def test_show_table_from_the_monitor_keeps_the_chart_and_the_3d_view(scene):
    """Slicer's GetLayoutWithTable sends any layout it does not know to Four-Up Table, which has no plot
    view: from the monitor, the table would hide the loss chart. The monitor gets its own table row."""
    slicers_choice = slicer.vtkSlicerTablesLogic.GetLayoutWithTable
    assert slicers_choice(layouts.MONITOR_LAYOUT_ID) == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView
    assert layouts.layout_with_table(layouts.MONITOR_LAYOUT_ID, slicers_choice) == layouts.MONITOR_TABLE_LAYOUT_ID
    assert layouts.layout_with_table(layouts.MONITOR_TABLE_LAYOUT_ID, slicers_choice) == layouts.MONITOR_TABLE_LAYOUT_ID
    four_up = slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView
    assert layouts.layout_with_table(four_up, slicers_choice) == slicers_choice(four_up)
    logic = slicer.vtkMRMLLayoutLogic()
    logic.SetMRMLScene(scene)
    layouts.select_layout(scene, layouts.MONITOR_TABLE_LAYOUT_ID)
    views = _view_classes(scene)
    assert all(views[cls] >= 1 for cls in views), views
    assert scene.GetFirstNodeByClass("vtkMRMLTableViewNode").GetLayoutName() == "TableView1"


@pytest.mark.parametrize("layout_id", [layouts.MONITOR_LAYOUT_ID, layouts.SIDE_BY_SIDE_LAYOUT_ID,
                                       layouts.MONITOR_TABLE_LAYOUT_ID])
def test_a_scene_saved_in_a_module_layout_reopens_with_it(tmp_path, layout_id):
    """A saved scene keeps only the layout's id: in a new session the description must be registered
    before the scene loads (the module does it at start-up), else the view area stays empty."""
    def new_application_scene():
        s = slicer.vtkMRMLScene()
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(s)
        logic = slicer.vtkMRMLLayoutLogic()  # as the layout manager makes it at start-up
        logic.SetMRMLScene(s)
        return s, logic

    saved, _ = new_application_scene()
    layouts.select_layout(saved, layout_id)
    path = tmp_path / "scene.mrml"
    saved.SetURL(str(path))
    saved.Commit()
    assert f'currentViewArrangement="{layout_id}"' in path.read_text()
    assert layouts.LAYOUTS[layout_id] not in path.read_text(), "the description is not saved with the scene"

    for registered in (False, True):
        scene, logic = new_application_scene()
        if registered:  # what CTNeRFRecon.registerLayouts does when Slicer starts
            layouts.register_layouts(logic.GetLayoutNode())
        scene.SetURL(str(path))
        scene.Import()
        layout_node = logic.GetLayoutNode()
        assert layout_node.GetViewArrangement() == layout_id
        description = layout_node.GetCurrentLayoutDescription() or ""
        assert (description == layouts.LAYOUTS[layout_id]) is registered, (registered, description[:80])


def test_side_by_side_puts_each_volume_in_its_own_linked_view(scene):
    volumes = []
    for name, value in (("recon", 1.0), ("reference", 2.0), ("difference", -1.0)):
        from CTNeRFReconLib.data import Volume
        from CTNeRFReconLib.geometry import VolumeGrid

        grid = VolumeGrid((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
        volumes.append(vn.create_volume_node(scene, Volume(np.full((8, 8, 8), value, np.float32), grid), name))
    red = _slice_view(scene, "Red")
    composites = [_slice_view(scene, name) for name in layouts.SIDE_BY_SIDE_VIEWS]
    assert layouts.show_side_by_side(scene, *volumes) == 3
    for composite, volume in zip(composites, volumes):
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundVolumeID() is None and composite.GetLinkedControl()
    assert red.GetBackgroundVolumeID() is None, "the standard views are left as they were"
    with pytest.raises(ValueError, match="reference"):
        layouts.show_side_by_side(scene, volumes[0], None)


def test_a_run_logs_its_events_and_keeps_its_snapshots_as_a_sequence(scene, case, tmp_path):
    options = SessionOptions(name="recon", keep_snapshots=True)
    session = run_session(scene, case, tmp_path / "run", "nerf", options=options, iterations=6, snapshot_every=2,
                          extra_args=["--progress-every", "1", "--residuals-every", "0.001"])
    assert session.state is SessionState.FINISHED, session.message
    text = "\n".join(session.log)
    assert "started:" in text and "snapshot 1" in text and "finished:" in text
    assert "engine:" in text, "the engine's own messages (stderr) reach the log"
    sequence = session.sequence_node
    assert sequence is not None and sequence.GetNumberOfDataNodes() == session.volumes_applied >= 3
    iterations = [int(sequence.GetNthIndexValue(i)) for i in range(sequence.GetNumberOfDataNodes())]
    assert iterations == sorted(iterations) and iterations[-1] == 6
    first = vn.array_from_node(sequence.GetNthDataNode(0))
    last = vn.array_from_node(sequence.GetNthDataNode(sequence.GetNumberOfDataNodes() - 1))
    np.testing.assert_array_equal(last, vn.array_from_node(session.output_node))
    assert not np.array_equal(first, last), "the sequence holds the volume as it was at each snapshot"
    assert session.sequence_browser_node.GetMasterSequenceNode() is sequence
    assert session.resumable and session.resume_request().resume
    assert session.projection_check is not None and session.bad_view_advice is None, "no view stands out"
    # the residual per view while it trained: a log line each, and one table updated in place to the end's
    assert "residuals at iteration 2: median" in text
    table = session.residuals_table_node
    assert table.GetTable().GetNumberOfRows() == 16 and scene.GetNodesByName("recon residuals").GetNumberOfItems() == 1
    assert table.GetTable().GetValueByName(3, "rmse").ToDouble() == pytest.approx(session.projection_check["rmse"][3])
    chart = session.residuals_chart_node  # the panel's Residual per view: RMSE over the view angle, from that table
    series = scene.GetNodeByID(chart.GetNthPlotSeriesNodeID(0))
    assert chart.GetNumberOfPlotSeriesNodes() == 1 and series.GetTableNodeID() == table.GetID()
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("angle_deg", "rmse")
    plot_view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode")  # what the monitor layout's plot view holds
    assert layouts.show_chart(scene, chart) == 1 and plot_view.GetPlotChartNodeID() == chart.GetID()


def test_an_earlier_run_folder_opens_with_its_volume_curve_and_scores_and_resumes(scene, case, tmp_path):
    run = tmp_path / "run"
    # a view left out and a model setting: both shape the checkpoint, which a resume without them refuses
    first = run_session(slicer.vtkMRMLScene(), case, run, "nerf", iterations=4, snapshot_every=2, drop_views=(3,),
                        extra_args=["--progress-every", "1", "--setting", "generator_width=16"])
    assert first.state is SessionState.FINISHED, first.message
    assert first.started_info["views"] == 15
    opened = open_run(scene, run, WorkerConfig(), SessionOptions(name="opened"))
    assert opened.state is SessionState.FINISHED
    np.testing.assert_array_equal(vn.array_from_node(opened.output_node),
                                  vn.load_volume_file(run / "volume.nrrd").array)
    assert opened.loss_table_node.GetTable().GetNumberOfRows() == 4
    assert opened.metrics_table_node is not None
    request = opened.resume_request()
    assert request.resume and request.out == run and request.data == case and request.method == "nerf"
    assert request.drop_views == (3,) and request.extra_args == ["--progress-every", "1", "--setting",
                                                                 "generator_width=16"]
    # continue it, after a "restart": a new session in the same folder, streaming into the opened node
    resumed = ReconstructionSession(scene, ReconstructRequest(**{**request.__dict__, "iterations": 8}),
                                    WorkerConfig(), SessionOptions(name="opened"), output_node=opened.output_node)
    resumed.start()
    assert resumed.wait(240) is SessionState.FINISHED, resumed.message
    started = next(e for e in resumed.events if e["event"] == "started")
    assert started["resumed"] is True
    assert resumed.output_node is opened.output_node
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_the_leave_out_views_field_reads_numbers_and_ranges():
    assert parse_view_list("") == () and parse_view_list("  ") == ()
    assert parse_view_list("12") == (12,) and parse_view_list("30, 10-12 12") == (10, 11, 12, 30)
    for wrong in ("a", "-1", "12-10", "3.5", "1,,x"):
        with pytest.raises(ValueError, match=r"Leave out views: '.*' is not a view number.*e\.g\. 12, 30"):
            parse_view_list(wrong)


def test_the_log_names_a_suspect_view_in_the_datas_numbering():
    event = {"event": "projection_check", "view": 4, "worst_view": 4, "rmse": [0.01] * 4 + [0.05] + [0.01] * 5,
             "median_rmse": 0.01, "held_out": [], "path": "/runs/a/projection_check.png"}
    line = bad_view_advice(event)
    assert line.startswith("view 4 of the data leaves 5.0 x the median residual") and "Leave out views to 4 " in line
    line = bad_view_advice(event, dropped=(1, 7))  # the run had left out views 1 and 7: its view 4 is the data's 5
    assert line.startswith("view 5 of the data") and "Leave out views to 1, 5, 7 and press Start" in line
    assert bad_view_advice({**event, "rmse": [0.01] * 4 + [0.025] + [0.01] * 5}) is None, "2.5 x is not singled out"
    assert bad_view_advice({**event, "held_out": [4]}) is None


def test_a_run_with_a_bad_frame_says_in_the_log_what_to_leave_out(scene, case, tmp_path):
    """The end-of-run projection check names the frame (flat-fielded with another exposure's flat here: log 2
    added), in the data's numbering with the views this run already left out, and what to enter in the panel."""
    from worker_case import write_edited_case

    bad = write_edited_case(case, tmp_path / "bad", lambda views: np.add(views[9], np.log(2.0), out=views[9]))
    session = run_session(scene, bad, tmp_path / "run", "fdk", drop_views=(2,))
    assert session.state is SessionState.FINISHED, session.message
    assert session.projection_check["worst_view"] == 8, "the run's own numbering: view 9 of the data is its 8th"
    text = "\n".join(session.log)
    assert "view 9 of the data leaves" in text and "set Advanced > Leave out views to 2, 9 and press Start" in text
    assert any(line.endswith(session.bad_view_advice) for line in session.log), "the panel shows it under the status"
    opened = open_run(slicer.vtkMRMLScene(), tmp_path / "run", WorkerConfig(), SessionOptions(name="opened"))
    assert opened.bad_view_advice == session.bad_view_advice, "an opened run says it again"
    assert opened.status_text.endswith("\n" + session.bad_view_advice)
    assert session.status_text.startswith(session.message)


def test_an_interrupted_run_opens_from_its_last_snapshot(scene, case, tmp_path):
    run = tmp_path / "run"
    first = run_session(slicer.vtkMRMLScene(), case, run, "nerf", iterations=4, snapshot_every=2)
    assert first.state is SessionState.FINISHED
    (run / "volume.nrrd").unlink()  # as after a kill before the final volume
    opened = open_run(scene, run, WorkerConfig(), SessionOptions(name="opened"))
    assert opened.state is SessionState.CANCELLED and "snapshot.nrrd" in opened.message
    assert opened.output_node.GetImageData() is not None


def test_a_folder_that_is_not_a_run_is_refused_with_the_file_and_the_fix(scene, tmp_path):
    with pytest.raises(ValueError, match=r"run\.json: not found.*choose the folder of an earlier run"):
        open_run(scene, tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"run\.json: field '\(file\)': unreadable"):
        open_run(scene, tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"options": {}}))
    with pytest.raises(ValueError, match=r"field 'options\.data'"):
        open_run(scene, tmp_path)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


def test_an_error_on_this_side_ends_the_run_and_its_process(scene, case, tmp_path):
    request = ReconstructRequest(data=case, out=tmp_path / "run", method="nerf", device="cpu", preset="preview",
                                 iterations=100000, snapshot_every=50)
    session = ReconstructionSession(scene, request, WorkerConfig(cancel_grace_s=2, terminate_grace_s=2),
                                    SessionOptions(name="recon")).start()
    deadline = __import__("time").monotonic() + 120
    while session.started_info is None and __import__("time").monotonic() < deadline:
        session.poll()
    assert session.started_info is not None
    session.cancel()  # the state a failing poll used to leave behind: CANCELLING, with the timer still running
    session.abort("the snapshot could not be read")
    assert session.state is SessionState.FAILED and session.state.done
    assert session.worker.exit_code is not None and not session.worker.descendants()


def test_the_library_reads_scans_without_pyyaml(case):
    """Slicer's own Python ships numpy, scipy and SimpleITK but not PyYAML: the panel's scan summary and
    projections must still work there for every format but a YAML description."""
    code = f"""
import sys
sys.modules['yaml'] = None  # import yaml now fails, as in Slicer's Python
from CTNeRFReconLib.slicer_bridge.projections import describe_scan, load_scan_file
print(describe_scan(load_scan_file({str(case)!r})))
from pathlib import Path
Path({str(case)!r} + '/../desc.yaml').resolve().write_text('type: circular')
from CTNeRFReconLib.formats import ScanFormatError
from CTNeRFReconLib.formats.stack import read_description
try:
    read_description(Path({str(case)!r} + '/../desc.yaml').resolve())
except ScanFormatError as exc:
    print('refused:', exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "16 views" in done.stdout or "16" in done.stdout.splitlines()[0]
    assert "refused:" in done.stdout and "PyYAML" in done.stdout and "pip install pyyaml" in done.stdout


SLICER_PYTHON_LACKS = ("torch", "yaml", "skimage", "matplotlib", "tqdm")
"""What Slicer's own Python does not ship that the engine uses (it ships numpy, scipy and SimpleITK)."""


def test_the_panels_scan_summary_is_read_in_a_subprocess_of_a_python_without_the_engine(case, tmp_path):
    """The panel reads a scan for its summary in a subprocess (`info --json --no-support`): a thread would
    hold Slicer's GIL through a long SimpleITK read and freeze the GUI. That subprocess runs in Slicer's
    own Python, which lacks the engine's torch and more, and must say the same as reading in place."""
    from CTNeRFReconLib.formats import load_scan
    from CTNeRFReconLib.slicer_bridge.commands import EngineCommand, info_args
    from CTNeRFReconLib.slicer_bridge.projections import describe_scan, describe_summary

    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        f"for name in {SLICER_PYTHON_LACKS!r}:\n"
        "    sys.modules[name] = None  # import fails, as in Slicer's own Python\n")
    env = dict(os.environ, PYTHONPATH=str(blocker))
    command = EngineCommand(info_args(case), WorkerConfig(env=env)).start()
    result = command.wait(timeout=120)
    assert "support" not in result, "the summary carves nothing (torch, seconds on a large scan)"
    assert describe_summary(result) == describe_scan(load_scan(case))
    assert "source-isocentre 300 mm" in describe_summary(result)

    from CTNeRFReconLib.slicer_bridge.worker import worker_environment

    for name in SLICER_PYTHON_LACKS:  # the stand-in for Slicer's Python really lacks them
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=worker_environment(env),
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, (name, probe.stderr[-300:])
    broken = EngineCommand(info_args(tmp_path / "no_such_scan"), WorkerConfig(env=env)).start()
    with pytest.raises(ValueError, match="no_such_scan"):
        broken.wait(timeout=120)


def test_the_panels_field_tools_run_in_the_engine_and_land_in_the_scene(scene, case, tmp_path):
    """Make surface, Export region and Projection check as the panel runs them: engine commands in a
    subprocess, their results as a model node (in RAS), a volume node and a picture node."""
    from CTNeRFReconLib.slicer_bridge import commands, field_tools

    run = tmp_path / "run"
    done = run_session(slicer.vtkMRMLScene(), case, run, "fdk")
    assert done.state is SessionState.FINISHED, done.message

    result = commands.EngineCommand(commands.surface_args(run, tmp_path / "body.vtp", "0.01")).start().wait(180)
    model = field_tools.model_node_from_file(scene, commands.result_path(result))
    bounds = [0.0] * 6
    model.GetRASBounds(bounds)
    # the body ellipsoid: semi-axes 50, 50, 40 mm about the origin; RAS flips x and y, not z
    np.testing.assert_allclose(bounds, [-50, 50, -50, 50, -40, 40], atol=6.0)

    roi = field_tools.roi_node_from_box(scene, (22.0, -14.0, 10.0), (32.0, 32.0, 32.0))
    centre, size = field_tools.box_from_roi_node(roi)
    np.testing.assert_allclose(centre, (22.0, -14.0, 10.0), atol=1e-9)
    result = commands.EngineCommand(commands.export_args(run, tmp_path / "zoom.nrrd", centre, size, 2.0)).start()
    exported = vn.load_volume_file(commands.result_path(result.wait(180)))
    assert exported.grid.shape_xyz == (16, 16, 16) and abs(exported.grid.spacing_xyz[0] - 2.0) < 1e-9
    assert exported.array.max() > 0.03, "the bright feature (mu 0.04 + body 0.02) is in the exported box"

    result = commands.EngineCommand(commands.check_args(run, tmp_path / "check.png", view=3)).start().wait(180)
    picture = field_tools.projection_check_node(scene, commands.result_path(result))
    assert picture.GetImageData() is not None and result["view"] == 3

    with pytest.raises(ValueError, match="failed: .*field"):
        commands.EngineCommand(commands.export_args(run, tmp_path / "far.nrrd", (5000, 0, 0), (10, 10, 10), 1.0)
                               ).start().wait(180)
