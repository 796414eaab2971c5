"""The Slicer module file against its .ui, checked without Slicer (the module cannot import here).

Every `self.ui.<name>` the widget uses must be a widget in Resources/UI/CTNeRFRecon.ui (and every
signal it connects must be one that widget's class has), every SlicerParameterName in the .ui must
be a field of the @parameterNodeWrapper class, the module keeps its four-class shape, the bridge
stays free of Qt and of the application, and the extension's metadata is complete.
"""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CTNeRFRecon"
BRIDGE_DIR = REPO / "CTNeRFReconLib" / "slicer_bridge"
MODULE_FILE = MODULE_DIR / "CTNeRFRecon.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CTNeRFRecon.ui"


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _classes(tree) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _widget_names(ui) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ui.iter("widget")}


def _parameter_names(ui) -> dict[str, str]:
    """Widget name -> the SlicerParameterName it binds to."""
    out = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[widget.get("name")] = prop.findtext("string")
    return out


def _wrapper_fields(tree) -> dict[str, ast.expr]:
    for cls in _classes(tree).values():
        if any(getattr(d, "id", None) == "parameterNodeWrapper" for d in cls.decorator_list):
            return {stmt.target.id: stmt.annotation for stmt in cls.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    raise AssertionError("no @parameterNodeWrapper class in the module file")


def test_ui_is_designer_xml(ui):
    assert ui.tag == "ui" and ui.get("version") == "4.0"
    top = ui.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "CTNeRFRecon"
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names)), "duplicate objectName in the .ui"
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= declared


def test_every_ui_attribute_is_a_widget(tree, ui):
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used, "the widget uses no self.ui.<name>: the check would be empty"
    missing = sorted(used - set(_widget_names(ui)))
    assert not missing, f"self.ui names with no widget of that objectName in {UI_FILE.name}: {missing}"


SIGNALS = {
    "QPushButton": {"clicked(bool)", "clicked()", "toggled(bool)"},
    "QToolButton": {"clicked(bool)", "clicked()"},
    "QCheckBox": {"toggled(bool)", "clicked(bool)", "stateChanged(int)"},
    "QComboBox": {"currentIndexChanged(int)", "currentTextChanged(QString)", "activated(int)"},
    "QSpinBox": {"valueChanged(int)"},
    "QDoubleSpinBox": {"valueChanged(double)"},
    "ctkSliderWidget": {"valueChanged(double)", "valueIsChanging(double)"},
    "ctkPathLineEdit": {"currentPathChanged(QString)"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)"},
}
"""Signals the module may connect, per widget class (a typo connects nothing, silently)."""


def test_connected_signals_exist(tree, ui):
    classes = _widget_names(ui)
    connects = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Attribute)
                and node.func.value.value.attr == "ui" and node.args and isinstance(node.args[0], ast.Constant)):
            connects.append((node.func.value.attr, node.args[0].value))
    assert connects, "the widget connects no self.ui signal: the check would be empty"
    bad = [f"{name} ({classes.get(name)}): {signal}" for name, signal in connects
           if signal not in SIGNALS.get(classes.get(name), set())]
    assert not bad, f"signals the widget class does not have (or that this test does not know yet): {bad}"


def test_parameter_names_are_wrapper_fields(tree, ui):
    bound = _parameter_names(ui)
    fields = _wrapper_fields(tree)
    unknown = sorted(f"{w} -> {p}" for w, p in bound.items() if p not in fields)
    assert not unknown, f"SlicerParameterName values that are not parameter node fields: {unknown}"
    unbound = sorted(set(fields) - set(bound.values()))
    assert not unbound, f"parameter node fields no widget is bound to: {unbound}"


def test_bound_widgets_have_connectable_types(tree, ui):
    """connectGui matches widget classes exactly: e.g. a str field needs a QComboBox with a Choice."""
    classes = _widget_names(ui)
    fields = _wrapper_fields(tree)
    allowed = {"str": {"QComboBox", "QLineEdit"}, "int": {"QSpinBox", "QSlider"},
               "float": {"QDoubleSpinBox", "ctkSliderWidget"}, "bool": {"QCheckBox"},
               "pathlib.Path": {"ctkPathLineEdit"}, "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"}}
    if "class _PathLineEditToStrConnector(GuiConnector)" in MODULE_FILE.read_text(encoding="utf-8"):
        allowed["str"] = allowed["str"] | {"ctkPathLineEdit"}  # the module registers that connector
    for widget, param in _parameter_names(ui).items():
        annotation = fields[param]
        text = ast.unparse(annotation)
        base = ast.unparse(annotation.slice.elts[0]) if text.startswith("Annotated[") else text
        assert classes[widget] in allowed[base], f"{widget} ({classes[widget]}) cannot bind a {base} field"
        if classes[widget] in ("QComboBox", "QSpinBox", "QCheckBox"):
            assert not text.startswith("pathlib"), widget
        if classes[widget] == "QComboBox" and base == "str":
            assert "Choice(" in text, f"{param}: a str bound to a QComboBox needs Annotated[str, Choice([...])]"


def test_module_shape(tree):
    classes = _classes(tree)
    for name, base in [("CTNeRFRecon", "ScriptedLoadableModule"), ("CTNeRFReconWidget", "ScriptedLoadableModuleWidget"),
                       ("CTNeRFReconLogic", "ScriptedLoadableModuleLogic"),
                       ("CTNeRFReconTest", "ScriptedLoadableModuleTest")]:
        assert name in classes, f"missing class {name}"
        assert base in [ast.unparse(b) for b in classes[name].bases]
    logic = ast.unparse(classes["CTNeRFReconLogic"])
    assert "self.ui" not in logic and "qt." not in logic, "the Logic must not touch widgets"
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(a.name == "*" for n in imports for a in n.names), "no `import *`"


def test_bridge_needs_no_qt_and_no_application():
    """The bridge runs on slicer-core's bare scene: no Qt, no slicer.app/modules/util/mrmlScene."""
    for path in sorted(BRIDGE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n and (n == "qt" or n.startswith(("qt.", "PythonQt", "ctk"))) for n in names), \
                    f"{path.name} imports Qt"
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer"
                    and node.attr in ("app", "modules", "util", "mrmlScene")):
                raise AssertionError(f"{path.name} uses slicer.{node.attr}; take the scene as an argument")


def _cmake_sets(text: str) -> dict[str, str]:
    return dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"', text))


def test_extension_metadata_is_complete():
    fields = _cmake_sets((REPO / "CMakeLists.txt").read_text())
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert fields.get(f"EXTENSION_{key}", "").strip(), f"EXTENSION_{key} is missing or empty"
    assert fields["EXTENSION_HOMEPAGE"].startswith("https://")
    module = MODULE_FILE.read_text(encoding="utf-8")
    assert f'self.parent.categories = ["{fields["EXTENSION_CATEGORY"]}"]' in module
    # the icon and screenshots are files of this repository, served raw from its main branch
    raw = re.compile(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(.+)")
    urls = [fields["EXTENSION_ICONURL"]] + fields["EXTENSION_SCREENSHOTURLS"].split()
    for url in urls:
        match = raw.fullmatch(url)
        assert match, f"{url}: not a raw URL of this repository's main branch"
        assert (REPO / match.group(1)).is_file(), f"{url}: {match.group(1)} is not in the repository"


def test_resources_exist():
    from PIL import Image

    icon = MODULE_DIR / "Resources" / "Icons" / "CTNeRFRecon.png"
    with Image.open(icon) as img:
        assert img.size == (128, 128)
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake and "CTNeRFReconLib" in cmake
    assert "slicer_add_python_unittest" in cmake
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert resource in cmake and (MODULE_DIR / resource.replace("${MODULE_NAME}", "CTNeRFRecon")).is_file()
    top = (MODULE_DIR.parent / "CMakeLists.txt").read_text()
    assert "add_subdirectory(CTNeRFRecon)" in top and "EXTENSION_DEPENDS" in top


def _widget_class(tree) -> ast.ClassDef:
    return _classes(tree)["CTNeRFReconWidget"]


def test_no_slot_on_a_bound_widget(tree, ui):
    """A slot connected to a widget that connectGui also binds runs before the connector has written the
    parameter node (Qt calls slots in connection order), so it reads the previous value; and connectGui
    refills a combo box each time the panel is entered, firing the slot. Bound widgets act through the
    parameter node's ModifiedEvent instead."""
    bound = set(_parameter_names(ui))
    connected = [node.func.value.attr for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                 and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Attribute)
                 and node.func.value.value.attr == "ui"]
    both = sorted(set(connected) & bound - {"volumeRenderingCheckBox"})
    assert not both, f"slots connected to widgets that connectGui binds: {both}"


def test_errors_are_shown_once(tree):
    """slicer.util.tryWithErrorDisplay re-raises after its dialog (Base/Python/slicer/util.py), so the
    widget's actions go through its own guard, which shows one dialog and stops the error there."""
    text = ast.unparse(_widget_class(tree))
    assert "tryWithErrorDisplay" not in text
    assert "def _guarded" in text


def test_widget_never_waits_on_a_process(tree):
    """The GUI thread never blocks on the engine: no wait()/stop() with a long timeout, no processEvents loop."""
    for node in ast.walk(_widget_class(tree)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert node.func.attr not in ("wait", "loadDemoData", "processEvents"), ast.unparse(node)


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{cls.name} has no method {name}")


def _calls(node: ast.AST) -> set[str]:
    """Names of the methods and functions called anywhere under `node`."""
    return {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            for n in ast.walk(node) if isinstance(n, ast.Call)}


def test_path_fields_follow_every_edit_and_keep_the_cursor(tree):
    """ctkPathLineEdit emits currentPathChanged only for text its validator accepts, and with no name
    filters the pattern is `.+` (CTK ctkPathLineEdit::updateHasValidInput, ctkUtils.cpp), so an emptied
    field never reached the node. And the wrapper writes every field back after each change: setting the
    same text again moves the cursor to the end on every keystroke (Slicer's QLineEditToStrConnector
    guards against it for the same reason)."""
    connector = _classes(tree)["_PathLineEditToStrConnector"]
    for name in ("_connect", "_disconnect"):
        text = ast.unparse(_method(connector, name))
        assert "currentPathChanged" not in text and "editTextChanged" in text, text
    assert "comboBox()" in ast.unparse(_method(connector, "_editor"))
    write = _method(connector, "write")
    guards = [n for n in ast.walk(write) if isinstance(n, ast.If) and isinstance(n.test, ast.Compare)
              and isinstance(n.test.ops[0], ast.NotEq)]
    assert guards and "currentPath" in ast.unparse(guards[0].body[0]), ast.unparse(write)
    assert not [n for n in write.body if "currentPath =" in ast.unparse(n) and n not in guards], \
        "the path is written only when it differs"


def test_the_exit_question_does_not_stop_the_run(tree):
    """qSlicerMainWindow::closeEvent runs after the event filter and asks whether to save a modified
    scene, where the user can still cancel the exit: the run must then go on. It is stopped in
    cleanup(), which Slicer calls when it unloads the module at the real exit."""
    widget = _widget_class(tree)
    assert "_stopSession" not in _calls(_method(widget, "confirmStopForExit"))
    assert "_stopSession" not in _calls(_classes(tree)["_ExitGuard"])
    assert "_stopSession" in _calls(_method(widget, "cleanup"))


def test_the_panel_stays_bound_to_its_parameter_node(tree):
    """Slicer 5.10's disconnectGui leaves the wrapper's ModifiedEvent observer behind (wrapper.py, fixed in
    5.12 by 16069d367e), and logic.getParameterNode() makes a new wrapper each time: unbinding in exit()
    and binding a new wrapper in enter() would pile up observers and wrappers on every visit."""
    widget = _widget_class(tree)
    assert "disconnectGui" not in _calls(_method(widget, "exit"))
    set_node = _method(widget, "setParameterNode")
    first = set_node.body[1] if isinstance(set_node.body[0], ast.Expr) else set_node.body[0]
    assert isinstance(first, ast.If) and isinstance(first.body[0], ast.Return), ast.unparse(first)
    assert "parameterNode is inputParameterNode.parameterNode" in ast.unparse(first.test)


def test_the_views_follow_the_runs_first_volume(tree):
    """The session holds the output node from the start when the panel gives it one: a node the selector
    made empty, or the last run's. Fitting the views to it and rendering it must wait for this run's first
    volume (`has_run_volume`, tested on a real scene in test_slicer_bridge.py): the fit is done once, and
    volume rendering refuses a node without voxels."""
    poll = _method(_widget_class(tree), "_pollSession")
    shown = next(n for n in ast.walk(poll) if isinstance(n, ast.If) and "_shownOutput" in ast.unparse(n.test))
    assert "session.has_run_volume" in ast.unparse(shown.test), ast.unparse(shown.test)


def test_the_path_fields_keep_a_history(tree, ui):
    """ctkPathLineEdit shows a history drop-down that stays empty unless the module names a settingKey and
    calls addCurrentPathToHistory (CTK's ctkPathLineEdit.cpp; Slicer's DICOMPatcher does both): every path
    field of the .ui gets a key, and a started run adds the paths it used."""
    path_fields = {name for name, cls in _widget_names(ui).items() if cls == "ctkPathLineEdit"}
    keys = next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "PATH_HISTORY_KEYS")
    assert set(keys) == path_fields and len(set(keys.values())) == len(keys)
    widget = _widget_class(tree)
    setup, start = (ast.unparse(_method(widget, name)) for name in ("setup", "_start"))
    assert ".settingKey = key" in setup and "PATH_HISTORY_KEYS.items()" in setup
    assert ".addCurrentPathToHistory()" in start and "PATH_HISTORY_KEYS" in start


def test_closing_the_scene_drops_pending_actions(tree):
    """A check of an external interpreter runs on a thread with the action to start after it (a run, the
    demo); when the scene closes meanwhile, that action must not start later in the next scene."""
    stop = ast.unparse(_method(_widget_class(tree), "_stopSession"))
    assert "self._probeJob = None" in stop and "self._describeJob = None" in stop


def test_module_layouts_are_registered_at_startup(tree):
    """A saved scene keeps only the layout id (vtkMRMLLayoutNode::WriteXML): the descriptions must be on
    the layout node before any scene loads, so the module registers them when Slicer has started."""
    connects = [ast.unparse(n) for n in ast.walk(_classes(tree)["CTNeRFRecon"])
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "connect"]
    assert "slicer.app.connect('startupCompleted()', registerLayouts)" in connects, connects
    register = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "registerLayouts")
    assert "register_layouts" in _calls(register)


def test_the_scan_summary_is_read_in_a_subprocess(tree):
    """Slicer's main thread holds the GIL outside Python (PythonQt without thread support), so a thread
    that reads a large stack through SimpleITK freezes the GUI at its next Python call: the summary is
    read by `info` in a subprocess (Testing/test_slicer_panel_bridge.py runs that subprocess)."""
    widget = _widget_class(tree)
    start = _method(widget, "_startDescribe")
    assert "_BackgroundCall" not in _calls(start) and "startDescribe" in _calls(start)
    assert "info_args" in _calls(_method(_classes(tree)["CTNeRFReconLogic"], "startDescribe"))


def test_threads_get_no_slicer_calls(tree):
    """PythonQt is not thread-safe: what runs on a `_BackgroundCall` thread may not reach `slicer.app`.
    The engine check's worker configuration reads Slicer's startup environment (a Qt call), so the
    panel builds it on the GUI thread and hands it to the thread."""
    with_engine = _method(_widget_class(tree), "_withEngine")
    calls = [n for n in ast.walk(with_engine) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "_BackgroundCall"]
    assert calls, "the engine check no longer runs on a thread: revisit this test"
    for call in calls:
        assert ast.unparse(call.args[0]) == "self.logic.missingEnginePackages" and len(call.args) == 3, ast.unparse(call)
    assert "workerConfig" in _calls(with_engine)
    probe = _method(_classes(tree)["CTNeRFReconLogic"], "missingEnginePackages")
    assert "workerConfig" in [a.arg for a in probe.args.args]


def test_a_closing_session_stops_the_pending_scan_summary(tree):
    """The summary starts 400 ms after typing pauses; a timer left running across a module reload or a
    scene close would start an `info` subprocess for a panel that is gone."""
    stop = ast.unparse(_method(_widget_class(tree), "_stopSession"))
    assert "self._describeTimer.stop()" in stop


def test_installs_refresh_the_import_caches(tree):
    """pip writes into site-packages from another process; `find_spec` right after it may still use the
    finders' cached listings unless `importlib.invalidate_caches()` runs (importlib's documentation)."""
    logic = _classes(tree)["CTNeRFReconLogic"]
    for method in (_method(logic, "installEnginePackages"), _method(_widget_class(tree), "_ensureSlicerPackages")):
        assert "invalidate_caches" in _calls(method), method.name


def _number(node: ast.expr) -> float:
    """A WithinRange bound written as a literal or simple arithmetic (2**31 - 1)."""
    return eval(compile(ast.Expression(node), "<bound>", "eval"), {"__builtins__": {}})  # noqa: S307


def test_spin_box_ranges_match_the_wrapper(tree, ui):
    """connectGui sets a bound spin box's range from WithinRange (parameterNodeWrapper/guiConnectors.py),
    so the .ui's own minimum and maximum are what Designer shows, not what Slicer uses: they must agree,
    or the .ui misleads whoever edits it."""
    fields = _wrapper_fields(tree)
    checked = 0
    for widget in ui.iter("widget"):
        if widget.get("class") not in ("QSpinBox", "QDoubleSpinBox"):
            continue
        props = {p.get("name"): p for p in widget.findall("property")}
        name = props.get("SlicerParameterName")
        if name is None:
            continue
        annotation = fields[name.findtext("string")]
        ranges = [n for n in ast.walk(annotation) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "WithinRange"]
        if not ranges:
            continue
        low, high = (_number(a) for a in ranges[0].args)
        # Qt's defaults when the .ui sets none: 0 and 99
        ui_low = float(props["minimum"][0].text) if "minimum" in props else 0.0
        ui_high = float(props["maximum"][0].text) if "maximum" in props else 99.0
        assert (ui_low, ui_high) == (low, high), f"{widget.get('name')}: .ui {ui_low}..{ui_high}, wrapper {low}..{high}"
        checked += 1
    assert checked >= 5


def test_the_engine_interpreter_is_a_python(tmp_path, monkeypatch):
    """Inside Slicer `sys.executable` is SlicerApp-real, which cannot run `-m CTNeRFReconLib`: the
    launcher PythonSlicer is taken from PATH or from beside the executable (as
    slicer.util.executePythonModule looks for it), a Python outside the application is itself, and
    anything else is refused with the fix. The function runs here as written in the module."""
    import pathlib
    import shutil
    import sys

    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_slicer_python")
    fake_sys = type("FakeSys", (), {"platform": "linux", "executable": ""})()
    namespace = {"pathlib": pathlib, "shutil": shutil, "sys": fake_sys}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(MODULE_FILE), "exec"), namespace)  # noqa: S102
    slicer_python = namespace["_slicer_python"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    app = tmp_path / "bin" / "SlicerApp-real"
    app.parent.mkdir()
    app.write_text("")
    fake_sys.executable = str(app)
    with pytest.raises(ValueError, match="PythonSlicer"):
        slicer_python()
    launcher = app.with_name("PythonSlicer")
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    assert slicer_python() == str(launcher)
    fake_sys.executable = sys.executable  # slicer-core, the tests: the interpreter itself
    assert slicer_python() == sys.executable
    monkeypatch.setenv("PATH", str(app.parent))
    assert slicer_python() == str(launcher)
