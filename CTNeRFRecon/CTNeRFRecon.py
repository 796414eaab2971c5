"""CTNeRFRecon: sparse-view cone-beam CT reconstruction in 3D Slicer.

The module is a thin GUI over CTNeRFReconLib: the engine runs in a subprocess (Slicer's Python or
an external one with CUDA PyTorch) and its growing volume streams into one scalar volume node
through CTNeRFReconLib.slicer_bridge. Four classes, as in Slicer's scripted-module template:
Module (metadata), Widget (GUI only), Logic (no widgets; raises ValueError with readable messages),
Test (a tiny CPU reconstruction of the demo phantom).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import pathlib
import shutil
import sys
import tempfile
import threading
import time
import traceback
from typing import Annotated

import ctk
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import (
    Choice,
    GuiConnector,
    WithinRange,
    parameterNodeGuiConnector,
    parameterNodeWrapper,
    unannotatedType,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _addLibraryToPath(moduleFile):
    """Put the folder that holds CTNeRFReconLib first on sys.path; return it (None: not found).

    Slicer puts only the folder of each module file on sys.path. An installed extension has the
    library copied beside CTNeRFRecon.py (CTNeRFRecon/CMakeLists.txt); a checkout has it in the
    repository root, the parent of this folder (also when that folder is reached through a link).
    The engine's subprocess gets the same folder on its PYTHONPATH (slicer_bridge.worker.LIB_ROOT).
    Self-contained (standard library only): Testing/test_module_library_path.py runs it alone.
    """
    import os
    import sys

    folders = []
    for path in (os.path.abspath(moduleFile), os.path.realpath(moduleFile)):
        here = os.path.dirname(path)
        folders += [here, os.path.dirname(here)]
    for root in folders:
        init = os.path.join(root, "CTNeRFReconLib", "__init__.py")
        if os.path.isfile(init) or os.path.isfile(init + "c"):  # .pyc alone: a byte-compiled install
            if root in sys.path:
                sys.path.remove(root)
            sys.path.insert(0, root)
            return root
    return None


LIBRARY_ROOT = _addLibraryToPath(__file__)
"""The folder CTNeRFReconLib is imported from (before any import of it in this file)."""
if LIBRARY_ROOT is None:
    logging.error("CTNeRFRecon: the library CTNeRFReconLib was found neither beside %s (an installed extension) "
                  "nor in the folder above it (a checkout); reinstall the extension, or add the CTNeRFRecon folder "
                  "of a complete checkout to the additional module paths", __file__)

ENGINE_PACKAGES = {"numpy": "numpy", "scipy": "scipy", "SimpleITK": "SimpleITK", "skimage": "scikit-image",
                   "yaml": "pyyaml", "psutil": "psutil", "tqdm": "tqdm", "nrrd": "pynrrd", "matplotlib": "matplotlib",
                   "ninja": "ninja"}
"""Import name -> pip name of what the engine needs besides torch (in the interpreter that runs it)."""

SLICER_PACKAGES = {"yaml": "pyyaml", "skimage": "scikit-image"}
"""Import name -> pip name of what the panel's own work in Slicer's Python needs (scan summary, projections,
comparison) and Slicer does not ship (it ships numpy, scipy and SimpleITK)."""

PATH_HISTORY_KEYS = {"dataPathLineEdit": "CTNeRFRecon/Scan", "runFolderPathLineEdit": "CTNeRFRecon/RunFolder",
                     "interpreterPathLineEdit": "CTNeRFRecon/EnginePython"}
"""QSettings keys of the path fields' drop-down history (ctkPathLineEdit keeps it only under a settingKey and
adds to it only when asked: addCurrentPathToHistory, called when a run starts, as DICOMPatcher does). CTK
reads the history into the drop-down when the key is set, so a path added shows from the next start of
Slicer, as in Slicer's own modules: reading it again at once would clear the field's text on the way."""

POLL_INTERVAL_MS = 250
DESCRIBE_DELAY_MS = 400
"""Pause in typing a data path before the scan is read for its summary."""

WINDOW_CHOICES = (("Auto", "auto"), ("Full range", "full"), ("Soft tissue", "soft_tissue"), ("Lung", "lung"),
                  ("Bone", "bone"))
"""Window presets offered in the panel (label, CTNeRFReconLib.slicer_bridge.volume_nodes preset)."""

SURFACE_THRESHOLDS = ("auto", "skin", "bone")
"""Thresholds offered for Make surface (the combo box also takes a value: 0.03, 150HU)."""

ROLE_ATTRIBUTE = "CTNeRFRecon.Role"
"""Node attribute that marks the nodes the panel reuses (projections, demo reference, difference)."""


#
# CTNeRFRecon
#


class CTNeRFRecon(ScriptedLoadableModule):
    """Module metadata; Slicer creates it once at start-up."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CTNeRFRecon"
        self.parent.categories = ["Tomographic Reconstruction"]
        self.parent.dependencies = []
        self.parent.contributors = ["The CTNeRFRecon authors"]
        self.parent.helpText = (
            "Reconstruct a CT volume from a sparse set of cone-beam X-ray projections with a deep-prior "
            "TensoRF field (or FDK), watch it improve live, and compare it with a reference CT. "
            "Start with <b>Load demo data</b>. The documentation is the README.md of the extension's source "
            "(its public repository is not published yet).")
        self.parent.acknowledgementText = (
            "Builds on the ideas of TensoRF, ZeroRF, NAF and R2-Gaussian, and on RTK and TIGRE for geometry "
            "conventions.")
        # Sample Data lists the demo scan; it is simulated, not downloaded (see registerSampleData)
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", registerLayouts)


def registerLayouts() -> None:
    """Register the module's view layouts when Slicer starts: a scene saved in one of them stores only
    its id, and a layout id without a description leaves the view area empty when the scene loads."""
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None or LIBRARY_ROOT is None:  # no main window (e.g. --no-main-window), or no library
        return
    from CTNeRFReconLib.slicer_bridge import layouts

    layouts.register_layouts(layoutManager.layoutLogic().GetLayoutNode())


def registerSampleData() -> None:
    """Add the demo scan to the Sample Data module. It has no file to download: its custom downloader
    opens this module and simulates the scan there, as *Load demo data* does. Sample Data calls a
    custom downloader only from its panel's button (SampleData.py); from a script,
    ``SampleData.downloadSample("CTNeRFReconDemoScan")`` would try to download the placeholder URI and
    fail, so scripts call ``CTNeRFReconLogic().loadDemoData()`` (README, "First run")."""
    try:
        import SampleData
    except ImportError:  # a Slicer built without Sample Data
        return
    icon = pathlib.Path(__file__).parent / "Resources" / "Icons" / "CTNeRFRecon.png"
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="CTNeRFRecon", sampleName="CTNeRFReconDemoScan", uris="simulated:ctnerfrecon-demo-scan",
        fileNames="CTNeRFReconDemoScan", nodeNames="demo reference", thumbnailFileName=str(icon),
        customDownloader=_simulateDemoFromSampleData)


def _simulateDemoFromSampleData(source=None) -> None:
    slicer.util.selectModule("CTNeRFRecon")
    slicer.util.getModuleWidget("CTNeRFRecon").onLoadDemo()


#
# Parameter node
#


@parameterNodeWrapper
class CTNeRFReconParameterNode:
    """The panel's state, saved with the scene. Each field is bound to the widget whose
    SlicerParameterName property names it (Resources/UI/CTNeRFRecon.ui)."""

    dataPath: str = ""
    """Scan file or folder (empty: none chosen)."""
    referenceVolume: vtkMRMLScalarVolumeNode
    """Optional reference CT for the comparison."""
    outputVolume: vtkMRMLScalarVolumeNode
    """The volume node the reconstruction streams into."""
    method: Annotated[str, Choice(["nerf", "fdk"])] = "nerf"
    preset: Annotated[str, Choice(["preview", "standard", "high"])] = "standard"
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    gridChoice: Annotated[str, Choice(["auto", "reference", "custom"])] = "auto"
    """Output grid: auto (the data's, else the field of view's), reference (the reference CT's grid),
    custom (the automatic box with the voxel size and/or counts below)."""
    gridSpacing: Annotated[float, WithinRange(0.0, 100.0)] = 0.0
    """Custom grid: voxel size in mm; 0: automatic."""
    gridSizeX: Annotated[int, WithinRange(0, 4096)] = 0
    """Custom grid: voxel counts (X, Y, Z); all 0: automatic."""
    gridSizeY: Annotated[int, WithinRange(0, 4096)] = 0
    gridSizeZ: Annotated[int, WithinRange(0, 4096)] = 0
    iterations: Annotated[int, WithinRange(0, 1000000)] = 0
    """0: the preset's."""
    snapshotEvery: Annotated[int, WithinRange(0, 1000000)] = 0
    """0: the method's default."""
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    showHU: bool = False
    timeLimit: Annotated[int, WithinRange(0, 604800)] = 0
    """Wall-clock budget of a nerf run in seconds (the schedule adapts to it); 0: none, the preset decides."""
    keepSnapshots: bool = False
    """Keep every streamed volume in a Sequence node, to scrub through the iterations afterwards."""
    tableBeyondView: bool = False
    """nerf: a table top or a holder leaves the field of view and the run's log does not say it trains past
    it: train at least 0.4 of the half-side past every side the object reaches where the edge rays see no
    body going on (`widen_reached_sides`; by default the run measures how far, `measure_thin_sides`)."""
    leaveOutViews: str = ""
    """Views of the data left out of the run (`--drop-views`), counted from 0 as the projection check names
    them: e.g. "12" or "10-12, 30"; empty: every view."""
    runFolder: str = ""
    """Empty: a new folder under Slicer's temporary folder for each run."""
    pythonInterpreter: str = ""
    """Empty: Slicer's own Python (PythonSlicer)."""
    volumeRendering: bool = False
    """Also show the output volume rendered in the 3D view (it follows the slice window/level)."""
    overlay: Annotated[str, Choice(["reference", "difference"])] = "reference"
    """What the slice views show over the reconstruction when comparing."""
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    """Opacity of the overlay: 0 shows the reconstruction only, 1 the overlay only."""


def _is_set(path) -> bool:
    return path is not None and str(path) not in ("", ".")


@parameterNodeGuiConnector
class _PathLineEditToStrConnector(GuiConnector):
    """A ctkPathLineEdit bound to a ``str`` field. Slicer's own connector binds pathlib.Path, whose
    empty value reads back as '.', so an empty field showed '.'; here empty stays empty.

    It listens to the text of the path's editor, not to ``currentPathChanged``: CTK emits that only
    for text its validator accepts, and with no name filters the validator's pattern is ``.+``
    (ctkPathLineEdit::updateHasValidInput, ctk::nameFiltersToRegularExpression), so clearing a field
    never reached the node and its last character (``/``) stayed there as the path.
    """

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) == str

    @staticmethod
    def create(widget, datatype):
        if _PathLineEditToStrConnector.canRepresent(widget, datatype):
            return _PathLineEditToStrConnector(widget)
        return None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def _editor(self):
        """The path's editable combo box (ctkPathLineEdit makes one unless its history button is off;
        its editTextChanged follows every edit of the text, empty included)."""
        return self._widget.comboBox()

    def _connect(self):
        self._editor().editTextChanged.connect(self.changed)

    def _disconnect(self):
        self._editor().editTextChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return str(self._widget.currentPath or "")

    def write(self, value) -> None:
        # the wrapper writes every field back after each change; setting the same text again would
        # move the cursor to the end on every keystroke (QLineEdit::setText), as Slicer's own
        # QLineEditToStrConnector notes, so only a different value is written
        text = str(value or "")
        if text != self.read():
            self._widget.currentPath = text


#
# CTNeRFReconWidget
#


class _Outcome:
    """What a guarded action ended with (see CTNeRFReconWidget._guarded)."""

    ok = True


class _ExitGuard(qt.QObject):
    """Asks before Slicer's main window closes while a reconstruction runs.

    Slicer offers no veto on quitting to modules; an event filter on the main window sees its close
    event before qSlicerMainWindow::closeEvent does, and can ignore it. A yes here does not stop the
    run: closeEvent asks next whether to save a modified scene and may still cancel the exit, and the
    run must go on then. The run stops when Slicer really quits (cleanup(), on the module's unload).
    """

    def __init__(self, widget):
        qt.QObject.__init__(self)
        self._widget = widget

    def eventFilter(self, watched, event):
        if event.type() == qt.QEvent.Close and self._widget.runIsActive():
            if not self._widget.confirmStopForExit():
                event.ignore()
                return True
        return False


class CTNeRFReconWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Slicer calls setup() once when the module is first shown, enter()/exit() each
    time it is shown/hidden, cleanup() when the application closes or the module is reloaded, and
    onSceneStartClose()/onSceneEndClose() around File > Close Scene.

    Nothing here blocks the GUI: the engine, the demo data, the check of an external interpreter and
    the reading of a scan for its summary run in a subprocess or a thread, and one timer
    (:meth:`onPollTimer`) collects their results.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._session = None
        self._lastRunFolder = None
        self._shownOutput = False
        self._shownChart = False
        self._differenceNode = None
        self._metricsTableNode = None
        self._overlayShown = False
        self._appliedOverlay = None
        self._appliedOpacity = None
        self._timer = None
        self._describeTimer = None
        self._describedPath = None
        self._describeJob = None
        self._demoJob = None
        self._probeJob = None
        self._busy = ""
        self._engineChecked = set()
        self._logShown = 0
        self._exitGuard = None
        self._commandJob = None

    def setup(self) -> None:
        """Build the panel from the .ui file and connect it (called once)."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTNeRFRecon.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CTNeRFReconLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Choices that act on the views (overlay, opacity) are not connected here: connectGui's own
        # connector writes the parameter node after any slot connected before it (Qt calls slots in
        # connection order), and refills the combo box each time the panel is entered. They are
        # applied from the parameter node's ModifiedEvent instead (_applyViewChoices), when they change.
        self.ui.dataFolderButton.connect("clicked()", self.onChooseDataFolder)
        self.ui.loadDemoButton.connect("clicked(bool)", self.onLoadDemo)
        self.ui.showProjectionsButton.connect("clicked(bool)", self.onShowProjections)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.openRunButton.connect("clicked(bool)", self.onOpenRunFolder)
        self.ui.monitorLayoutButton.connect("clicked(bool)", self.onMonitorLayout)
        self.ui.residualChartButton.connect("clicked(bool)", self.onResidualChart)
        self.ui.volumeRenderingCheckBox.connect("toggled(bool)", self.onVolumeRenderingToggled)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.showOverlayButton.connect("clicked(bool)", self.onShowOverlay)
        self.ui.sideBySideButton.connect("clicked(bool)", self.onSideBySide)
        self.ui.flickButton.connect("clicked(bool)", self.onFlick)
        self.ui.showTableButton.connect("clicked(bool)", self.onShowTable)
        self.ui.makeSurfaceButton.connect("clicked(bool)", self.onMakeSurface)
        self.ui.placeBoxButton.connect("clicked(bool)", self.onPlaceBox)
        self.ui.exportRegionButton.connect("clicked(bool)", self.onExportRegion)
        self.ui.projectionCheckButton.connect("clicked(bool)", self.onProjectionCheck)
        self.ui.surfaceThresholdComboBox.clear()
        for threshold in SURFACE_THRESHOLDS:
            self.ui.surfaceThresholdComboBox.addItem(threshold)
        self.ui.windowPresetComboBox.clear()
        for label, preset in WINDOW_CHOICES:
            self.ui.windowPresetComboBox.addItem(label, preset)
        # activated: the user's choice only, never a programmatic change
        self.ui.windowPresetComboBox.connect("activated(int)", self.onWindowPresetChosen)
        # before the parameter node is bound: the history fills the drop-downs, the node then sets the text
        for name, key in PATH_HISTORY_KEYS.items():
            getattr(self.ui, name).settingKey = key

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTimer)
        self._describeTimer = qt.QTimer()
        self._describeTimer.setSingleShot(True)
        self._describeTimer.setInterval(DESCRIBE_DELAY_MS)
        self._describeTimer.connect("timeout()", self._startDescribe)

        mainWindow = slicer.util.mainWindow()
        if mainWindow is not None:
            self._exitGuard = _ExitGuard(self)
            mainWindow.installEventFilter(self._exitGuard)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Application exit or module reload: stop the worker, unbind the GUI, drop observers."""
        self._stopSession("Slicer is closing the module")
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNode = None
        if self._exitGuard is not None and slicer.util.mainWindow() is not None:
            slicer.util.mainWindow().removeEventFilter(self._exitGuard)
        self._exitGuard = None
        self.removeObservers()

    def enter(self) -> None:
        """The module is shown: make sure the parameter node exists and is bound (a no-op when the
        panel is still bound to it from the last visit)."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """The module is hidden. The GUI stays bound to its parameter node (the run goes on; the timer
        keeps polling): Slicer 5.10's disconnectGui leaves the wrapper's own ModifiedEvent observer on
        the node (parameterNodeWrapper/wrapper.py, fixed in 5.12), so unbinding here and binding a new
        wrapper on every enter() would leave one more observer, and its wrapper, on each visit."""

    def onSceneStartClose(self, caller, event) -> None:
        """The scene is about to close (this cannot be refused): stop the run before its nodes go away;
        its run folder keeps the last volume, which *Open run folder* loads again."""
        if self.runIsActive():
            folder = self._session.run_dir
            self._stopSession("the scene was closed")
            self._appendLog(f"the scene was closed: the run was stopped; its volume is in {folder} "
                            "(Open run folder loads it, Resume continues it)")
        else:
            self._stopSession()
        self._differenceNode = self._metricsTableNode = None
        self._overlayShown = False
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """The scene was closed: bind a fresh parameter node when the panel is shown."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the GUI to a parameter node (two-way, through connectGui). Binding the MRML node the GUI
        is bound to already changes nothing: logic.getParameterNode() returns a new wrapper each time."""
        if (self._parameterNode is not None and inputParameterNode is not None
                and self._parameterNode.parameterNode is inputParameterNode.parameterNode):
            return
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            # what the views show now is what the node says now: a re-bind is not a change of choice
            self._appliedOverlay = self._parameterNode.overlay
            self._appliedOpacity = self._parameterNode.overlayOpacity
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._scheduleDescribe()
        self._applyViewChoices()
        self._updateButtons()

    def _applyViewChoices(self) -> None:
        """Overlay and opacity changed in the node (by the GUI or the console): update the views when a
        comparison is on view. Acting on the node's value, after it changed, is what makes the combo
        box act on the new choice and not on the previous one."""
        p = self._parameterNode
        if p is None:
            return
        overlay, opacity = p.overlay, p.overlayOpacity
        overlayChanged, opacityChanged = overlay != self._appliedOverlay, opacity != self._appliedOpacity
        self._appliedOverlay, self._appliedOpacity = overlay, opacity
        if not self._overlayShown:
            return
        if overlayChanged and p.outputVolume is not None and self._overlayNode() is not None:
            with self._guarded("Failed to show the comparison."):
                self._showOverlay()
        elif opacityChanged:
            self.logic.setOverlayOpacity(opacity)

    def runIsActive(self) -> bool:
        return self._session is not None and not self._session.state.done

    def _updateButtons(self) -> None:
        p = self._parameterNode
        running = self.runIsActive()
        idle = not running and not self._busy
        hasData = p is not None and bool(p.dataPath)
        self.ui.startButton.enabled = hasData and idle
        self.ui.cancelButton.enabled = running
        stopping = running and self._session.state.value == "cancelling"
        self.ui.cancelButton.text = "Force stop" if stopping else "Cancel"
        self.ui.resumeButton.enabled = idle and self._session is not None and self._session.resumable
        self.ui.openRunButton.enabled = idle
        self.ui.residualChartButton.enabled = (self._session is not None
                                               and self._session.residuals_chart_node is not None)
        self.ui.showProjectionsButton.enabled = hasData and not self._busy
        self.ui.loadDemoButton.enabled = idle and self._demoJob is None
        self.ui.dataFolderButton.enabled = not self._busy
        custom = p is not None and p.gridChoice == "custom"
        for widget in (self.ui.gridSpacingSpinBox, self.ui.gridSizeXSpinBox, self.ui.gridSizeYSpinBox,
                       self.ui.gridSizeZSpinBox):
            widget.enabled = custom
        hasOutput = p is not None and p.outputVolume is not None and p.outputVolume.GetImageData() is not None
        hasReference = p is not None and p.referenceVolume is not None
        self.ui.compareButton.enabled = hasOutput and hasReference and not running and not self._busy
        canOverlay = hasOutput and self._overlayNode() is not None
        self.ui.showOverlayButton.enabled = canOverlay
        self.ui.flickButton.enabled = canOverlay
        self.ui.sideBySideButton.enabled = hasOutput and hasReference
        self.ui.windowPresetComboBox.enabled = hasOutput or hasReference
        self.ui.showTableButton.enabled = self._metricsTableNode is not None
        hasRun = self._lastRunFolder is not None and (pathlib.Path(self._lastRunFolder) / "run.json").is_file()
        tools = hasRun and not running and self._commandJob is None and not self._busy
        for button in (self.ui.makeSurfaceButton, self.ui.placeBoxButton, self.ui.projectionCheckButton):
            button.enabled = tools
        self.ui.exportRegionButton.enabled = tools and self.logic.roleNode("export box", "vtkMRMLMarkupsROINode") is not None

    def _overlayNode(self):
        """The volume chosen to go over the reconstruction: the reference or the difference."""
        p = self._parameterNode
        if p is None:
            return None
        return self._differenceNode if p.overlay == "difference" else p.referenceVolume

    @contextlib.contextmanager
    def _guarded(self, message: str, waitCursor: bool = True):
        """Run an action: on an error, one dialog (with the traceback as details) and a log line, and the
        error goes no further. Slicer's own error-display context manager re-raises after its dialog, so
        nested uses of it showed two dialogs and then a traceback. The wait cursor is off again before any dialog;
        the buttons are brought up to date whatever happened."""
        outcome = _Outcome()
        cursor = waitCursor
        if cursor:
            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            yield outcome
        except Exception as exc:  # every failure of an action ends here, shown once
            outcome.ok = False
            if cursor:
                slicer.app.restoreOverrideCursor()
                cursor = False
            logging.exception("CTNeRFRecon: %s", message)
            self._appendLog(f"error: {message} {exc}")
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(f"{message}\n\n{exc}", detailedText=traceback.format_exc())
        finally:
            if cursor:
                slicer.app.restoreOverrideCursor()
            self._updateButtons()

    def _appendLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    # ------------------------------------------------------------------------- scan summary

    def _scheduleDescribe(self) -> None:
        """A new data path: summarise it once typing has paused (the read runs on a thread)."""
        p = self._parameterNode
        path = p.dataPath if p is not None and p.dataPath else None
        if path == self._describedPath:
            return
        self._describedPath = path
        self.ui.scanInfoLabel.text = ""
        if path is not None:
            self._describeTimer.start()

    def _startDescribe(self) -> None:
        path = self._describedPath
        if path is None or not pathlib.Path(path).exists():
            return
        needs = self.logic.packagesToRead(path)
        if not self._ensureSlicerPackages("summarise the scan", needs, ask=False):
            self.ui.scanInfoLabel.text = ("Summary not available: Slicer's Python lacks "
                                          + ", ".join(self.logic.missingSlicerPackages(needs))
                                          + " (Show projections offers to install it)")
            return
        self.ui.scanInfoLabel.text = "reading the scan..."
        if self._describeJob is not None:
            self._describeJob[1].kill()  # an earlier path's reading: its answer is not wanted any more
        try:
            self._describeJob = (path, self.logic.startDescribe(path))
        except ValueError as exc:  # Slicer's Python could not be started: said in the summary's place
            self._describeJob = None
            self.ui.scanInfoLabel.text = f"Summary not available: {exc}"
            return
        self._timer.start()

    def _finishDescribe(self) -> None:
        if self._describeJob is None or not self._describeJob[1].poll():
            return
        path, job = self._describeJob
        self._describeJob = None
        if path != self._describedPath:
            return  # the path changed while it was read
        try:
            self.ui.scanInfoLabel.text = self.logic.finishDescribe(job.result())
        except ValueError as exc:
            self.ui.scanInfoLabel.text = f"Not readable as projection data: {exc}"

    # ------------------------------------------------------------------------------ engine

    def _withEngine(self, action) -> None:
        """Run ``action`` once the engine's interpreter is known to have its packages: Slicer's own is
        checked at once, an external one on a thread (it may take many seconds to start); what is
        missing is offered for installation first."""
        interpreter = self._parameterNode.pythonInterpreter
        if interpreter in self._engineChecked:
            action()
            return
        if interpreter:
            # the worker's configuration reads Slicer's startup environment (a Qt call): here, on the GUI
            # thread; the thread only asks the interpreter, in a subprocess
            with self._guarded("The engine's Python could not be checked.", waitCursor=False) as outcome:
                config = self.logic.workerConfig(interpreter)
            if not outcome.ok:
                return
            self._busy = "checking the engine's Python"
            self.ui.statusLabel.text = f"checking the Python at {interpreter}..."
            self._probeJob = (_BackgroundCall(self.logic.missingEnginePackages, interpreter, config), action)
            self._timer.start()
            self._updateButtons()
            return
        self._afterEngineCheck(interpreter, self.logic.missingEnginePackages(interpreter), action)

    def _finishProbe(self) -> None:
        if self._probeJob is None or not self._probeJob[0].done:
            return
        job, action = self._probeJob
        self._probeJob = None
        self._busy = ""
        self.ui.statusLabel.text = ""
        if job.error is not None:
            with self._guarded("The engine's Python could not be checked.", waitCursor=False):
                raise job.error
            return
        self._afterEngineCheck(job.args[0], job.result, action)

    def _afterEngineCheck(self, interpreter, missing, action) -> None:
        if "torch" in missing and not interpreter and importlib.util.find_spec("PyTorchUtils") is None:
            # Slicer's PyTorch comes from the PyTorch extension only (pip's Windows wheel is CPU-only): no
            # offer to install what cannot be installed from here
            slicer.util.errorDisplay(
                "The reconstruction engine needs PyTorch, which Slicer installs through the PyTorch extension, "
                "and that extension is missing. Install 'PyTorch' with View > Extensions Manager and restart "
                "Slicer, or choose under Advanced a Python interpreter that has PyTorch.", "CTNeRFRecon setup")
            return
        if missing:
            names = ", ".join(missing)
            where = f"the Python at {interpreter}" if interpreter else "Slicer"
            how = ("They are installed with that interpreter's pip; for a CUDA build of PyTorch there, follow "
                   "pytorch.org instead." if interpreter else
                   "PyTorch comes from the PyTorch extension, which picks the build that fits your GPU.")
            if not slicer.util.confirmOkCancelDisplay(
                    f"The reconstruction engine needs these Python packages in {where}: {names}.\n\n"
                    f"Install them now? {how} This can take several minutes.", "CTNeRFRecon setup"):
                self._updateButtons()
                return
            self._busy = "installing packages"
            self._updateButtons()
            with self._guarded("Failed to install the engine's packages.") as outcome:
                self.logic.installEnginePackages(missing, interpreter)
            self._busy = ""
            self._updateButtons()
            if not outcome.ok:
                return
        self._engineChecked.add(interpreter)
        action()

    def _ensureSlicerPackages(self, purpose: str, needs=("yaml", "skimage"), ask: bool = True) -> bool:
        """What the panel itself runs in Slicer's Python may need PyYAML (a YAML scan description) or
        scikit-image (SSIM), which Slicer does not ship; offer to install what ``needs`` lacks there."""
        missing = self.logic.missingSlicerPackages(needs)
        if not missing:
            return True
        if not ask:
            return False
        if not slicer.util.confirmOkCancelDisplay(
                f"To {purpose}, Slicer's own Python needs: {', '.join(missing)}.\n\nInstall them now (pip)?",
                "CTNeRFRecon setup"):
            return False
        self._busy = "installing packages"
        self._updateButtons()
        with self._guarded("Failed to install the packages into Slicer's Python.") as outcome:
            slicer.util.pip_install(" ".join(missing))
            importlib.invalidate_caches()  # pip wrote in another process; find_spec below must see it
        self._busy = ""
        self._updateButtons()
        return outcome.ok and not self.logic.missingSlicerPackages(needs)

    # -------------------------------------------------------------------------------- inputs

    def onChooseDataFolder(self) -> None:
        """The path field's own browse button opens a file dialog (ctkPathLineEdit does so whenever its
        filters include files); RTK and R2-Gaussian cases and the demo data are folders."""
        p = self._parameterNode
        start = p.dataPath if p is not None and p.dataPath else ""
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose the scan folder", start)
        if folder:
            p.dataPath = folder

    def onLoadDemo(self) -> None:
        self._withEngine(self._startDemo)

    def _startDemo(self) -> None:
        with self._guarded("Failed to make the demo data.", waitCursor=False):
            self._demoJob = self.logic.startDemoData(self._parameterNode.pythonInterpreter)
            self._appendLog(f"simulating the demo scan into {self._demoJob.folder}")
            self.ui.statusLabel.text = "simulating the demo scan (a few seconds)..."
            self._timer.start()

    def _finishDemo(self) -> None:
        job = self._demoJob
        if job is None:
            return
        job.worker.poll()
        if job.worker.exit_code is None:
            return
        self._demoJob = None
        self.ui.statusLabel.text = ""
        with self._guarded("Failed to make the demo data."):
            folder, reference = self.logic.finishDemoData(job)
            self._parameterNode.dataPath = str(folder)
            self._parameterNode.referenceVolume = reference
            slicer.util.setSliceViewerLayers(background=reference, foreground=None, fit=True)
            self._appendLog(f"demo scan ready in {folder}; press Start")

    def onShowProjections(self) -> None:
        if not self._ensureSlicerPackages("read the projections",
                                          self.logic.packagesToRead(self._parameterNode.dataPath)):
            return
        with self._guarded("Failed to show the projections."):
            node = self.logic.showProjections(self._parameterNode.dataPath)
            slicer.util.setSliceViewerLayers(background=node, foreground=None, fit=True)

    # ----------------------------------------------------------------------------------- run

    def onStart(self) -> None:
        self._withEngine(lambda: self._start(resume=False))

    def onResume(self) -> None:
        self._withEngine(lambda: self._start(resume=True))

    def _start(self, resume: bool) -> None:
        with self._guarded("Failed to start the reconstruction."):
            if resume:
                session = self.logic.resumeReconstruction(self._session, self._parameterNode)
            else:
                session = self.logic.startReconstruction(self._parameterNode)
            self._session = session
            self._lastRunFolder = session.run_dir
            for name in PATH_HISTORY_KEYS:  # what a run used goes into the fields' drop-downs (empty ones do not)
                getattr(self.ui, name).addCurrentPathToHistory()
            self._shownOutput = self._shownChart = False
            self._differenceNode = self._metricsTableNode = None
            self._logShown = 0
            self.ui.progressBar.maximum = 0
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = session.message
            self.ui.metricsLabel.text = ""
            self._appendLog(f"{'resuming' if resume else 'starting'} a run in {session.run_dir}")
            self._timer.start()

    def onCancel(self) -> None:
        """Cancel: the engine writes its last volume and stops. Pressed again while it is stopping
        (Force stop): the engine and its children are killed; the run folder keeps its last snapshot."""
        from CTNeRFReconLib.slicer_bridge.session import SessionState

        session = self._session
        if session is None:
            return
        if session.state is SessionState.CANCELLING:
            if slicer.util.confirmOkCancelDisplay(
                    "Stop the engine at once? It is writing its last volume; stopped now, the run keeps its "
                    "last snapshot instead.", "CTNeRFRecon"):
                with self._guarded("Failed to stop the engine."):
                    session.worker.kill_tree()
                    self._appendLog("the engine was killed (Force stop)")
        else:
            session.cancel()
        self.ui.statusLabel.text = session.message
        self._updateButtons()

    def onOpenRunFolder(self) -> None:
        """Load an earlier run (after a restart of Slicer too) and make it the one Resume continues."""
        start = str(self._lastRunFolder or pathlib.Path(slicer.app.temporaryPath) / "CTNeRFRecon")
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Open a CTNeRFRecon run folder", start)
        if not folder:
            return
        with self._guarded("Failed to open the run folder."):
            session = self.logic.openRun(folder, self._parameterNode)
            self._session = session
            self._lastRunFolder = session.run_dir
            self._logShown = 0
            self._differenceNode = session.difference_node
            self._metricsTableNode = session.metrics_table_node
            self._parameterNode.outputVolume = session.output_node
            slicer.util.setSliceViewerLayers(background=session.output_node, fit=True)
            if session.chart_node is not None:
                self.logic.showMonitorLayout(session.chart_node)
            self._showLog(session)
            self.ui.statusLabel.text = session.status_text
            if session.metrics_table_node is not None:
                self.ui.metricsLabel.text = self.logic.metricsSummary(
                    self.logic.metricsRows(session.metrics_table_node))

    def onResidualChart(self) -> None:
        with self._guarded("Failed to show the residual chart."):
            self.logic.showMonitorLayout(self._session.residuals_chart_node if self._session is not None else None)

    def onMonitorLayout(self) -> None:
        with self._guarded("Failed to change the layout."):
            self.logic.showMonitorLayout(self._session.chart_node if self._session is not None else None)

    def onVolumeRenderingToggled(self, checked: bool) -> None:
        node = self._parameterNode.outputVolume if self._parameterNode else None
        if node is not None and node.GetImageData() is not None:
            with self._guarded("Failed to change the volume rendering."):
                self.logic.showVolumeRendering(node, checked)

    def onWindowPresetChosen(self, index: int) -> None:
        preset = self.ui.windowPresetComboBox.itemData(index)
        p = self._parameterNode
        with self._guarded("Failed to set the window."):
            for node in (p.outputVolume, p.referenceVolume):
                if node is not None and node.GetImageData() is not None:
                    self.logic.setCTWindow(node, preset)

    # ------------------------------------------------------------------------------- compare

    def onCompare(self) -> None:
        if not self._ensureSlicerPackages("score the comparison (SSIM)", ("skimage",)):
            self._appendLog("comparing without scikit-image: SSIM is left out")
        with self._guarded("Failed to compare with the reference."):
            p = self._parameterNode
            rows, self._differenceNode, self._metricsTableNode = self.logic.compare(
                p.referenceVolume, p.outputVolume, self._session)
            self.ui.metricsLabel.text = self.logic.metricsSummary(rows)
            self._showOverlay()

    def onShowOverlay(self) -> None:
        with self._guarded("Failed to show the comparison."):
            self._showOverlay()

    def _showOverlay(self) -> None:
        p = self._parameterNode
        self.logic.showComparison(p.outputVolume, self._overlayNode(), p.overlayOpacity)
        self._overlayShown = True

    def onSideBySide(self) -> None:
        with self._guarded("Failed to show the side-by-side comparison."):
            p = self._parameterNode
            if self._differenceNode is None:
                rows, self._differenceNode, self._metricsTableNode = self.logic.compare(
                    p.referenceVolume, p.outputVolume, self._session)
                self.ui.metricsLabel.text = self.logic.metricsSummary(rows)
            self.logic.showSideBySide(p.outputVolume, p.referenceVolume, self._differenceNode)

    def onFlick(self) -> None:
        """Swap between the reconstruction alone and the overlay alone (opacity 0 <-> 1)."""
        from CTNeRFReconLib.slicer_bridge.views import flicked

        p = self._parameterNode
        if not self._overlayShown:
            with self._guarded("Failed to show the comparison."):
                self._showOverlay()
        p.overlayOpacity = flicked(p.overlayOpacity)  # the slider follows; _applyViewChoices moves the views

    def onShowTable(self) -> None:
        if self._metricsTableNode is not None:
            with self._guarded("Failed to show the table."):
                self.logic.showTable(self._metricsTableNode)

    # --------------------------------------------------------------------------- field tools

    def _startCommand(self, what: str, start, finish) -> None:
        """Run an engine command on the last run folder in the background; ``finish(result)`` after."""
        with self._guarded(f"Failed to start: {what}.", waitCursor=False):
            job = start(self._lastRunFolder, self._parameterNode.pythonInterpreter)
            self._commandJob = (job, finish, what)
            self._appendLog(f"{what}: python -m CTNeRFReconLib {' '.join(job.args)}")
            self.ui.statusLabel.text = f"{what}..."
            self._timer.start()

    def _finishCommand(self) -> None:
        if self._commandJob is None or not self._commandJob[0].poll():
            return
        job, finish, what = self._commandJob
        self._commandJob = None
        self.ui.statusLabel.text = ""
        with self._guarded(f"Failed: {what}."):
            message = finish(job.result())
            self._appendLog(f"{what}: {message}")

    def onMakeSurface(self) -> None:
        threshold = self.ui.surfaceThresholdComboBox.currentText.strip() or "auto"
        self._startCommand("making the surface",
                           lambda run, py: self.logic.startSurface(run, threshold, py), self.logic.finishSurface)

    def onPlaceBox(self) -> None:
        with self._guarded("Failed to place the export box."):
            self.logic.placeExportBox(self._lastRunFolder)

    def onExportRegion(self) -> None:
        spacing = float(self.ui.exportSpacingSpinBox.value)
        self._startCommand("exporting the region",
                           lambda run, py: self.logic.startExport(run, spacing, py), self.logic.finishExport)

    def onProjectionCheck(self) -> None:
        view = int(self.ui.checkViewSpinBox.value)
        self._startCommand("checking the projections",
                           lambda run, py: self.logic.startProjectionCheck(run, None if view < 0 else view, py),
                           self.logic.finishProjectionCheck)

    # ------------------------------------------------------------------------------- polling

    def onPollTimer(self) -> None:
        """Collect what the background work produced (never blocks); stop when nothing is left."""
        self._finishDescribe()
        self._finishProbe()
        self._finishDemo()
        self._finishCommand()
        self._pollSession()
        if (self._describeJob is None and self._probeJob is None and self._demoJob is None and self._commandJob is None
                and not self.runIsActive()):
            self._timer.stop()

    def _pollSession(self) -> None:
        session = self._session
        if session is None or session.state.done or session.worker is None:
            return
        try:
            session.poll()
        except Exception as exc:  # e.g. a volume that cannot be read: end the run whatever happens
            logging.exception("CTNeRFRecon: applying a worker event failed")
            session.abort(f"the reconstruction could not be shown: {exc}")
            self._showLog(session)
            self._onRunDone(session)
            self._updateButtons()
            return
        self._showLog(session)
        self._showProgress(session)
        if session.chart_node is not None and not self._shownChart:
            self._shownChart = True  # the loss curve from its first point; it redraws as rows arrive
            with self._guarded("Failed to show the loss chart.", waitCursor=False):
                self.logic.showMonitorLayout(session.chart_node)
        if session.has_run_volume and not self._shownOutput:  # not an empty node, nor the last run's volume
            self._shownOutput = True
            self._parameterNode.outputVolume = session.output_node
            slicer.util.setSliceViewerLayers(background=session.output_node, fit=True)
            self._linkSliceViews()
            if self._parameterNode.volumeRendering:
                with self._guarded("Failed to show the volume rendering.", waitCursor=False):
                    self.logic.showVolumeRendering(session.output_node, True)
        if session.state.done:
            self._onRunDone(session)
        self._updateButtons()

    def _showLog(self, session) -> None:
        lines = session.log
        if len(lines) < self._logShown:
            self._logShown = 0
        for line in lines[self._logShown:]:
            self.ui.logTextEdit.appendPlainText(line)
        self._logShown = len(lines)

    def _showProgress(self, session) -> None:
        fraction = session.progress.fraction
        if fraction is not None:
            self.ui.progressBar.maximum = 1000
            self.ui.progressBar.value = int(1000 * fraction)
        elif not session.state.done:
            self.ui.progressBar.maximum = 0  # busy indicator until the first figures arrive
        summary = session.progress.summary()
        self.ui.statusLabel.text = summary if summary and not session.state.done else session.message

    def _onRunDone(self, session) -> None:
        from CTNeRFReconLib.slicer_bridge.session import SessionState

        self.ui.progressBar.maximum = 1000
        self.ui.progressBar.value = 1000 if session.state is SessionState.FINISHED else self.ui.progressBar.value
        self.ui.statusLabel.text = session.status_text
        if session.bad_view_advice and session.residuals_chart_node is not None:
            # the frame's spike where the loss curve was (no change of layout: the plot views there are)
            with self._guarded("Failed to show the residual chart.", waitCursor=False):
                self.logic.showChart(session.residuals_chart_node)
        if session.metrics_table_node is not None:
            self._metricsTableNode = session.metrics_table_node
            self.ui.metricsLabel.text = self.logic.metricsSummary(self.logic.metricsRows(session.metrics_table_node))
        if session.difference_node is not None:
            self._differenceNode = session.difference_node
        if session.output_node is not None and self._overlayNode() is not None:
            with self._guarded("Failed to show the comparison.", waitCursor=False):
                self._showOverlay()
        if session.state is SessionState.FAILED and not slicer.app.testingEnabled():
            hint = self.logic.failureHint(session.failure_kind)
            slicer.util.errorDisplay(f"The reconstruction failed: {session.message}" + (f"\n\n{hint}" if hint else ""))

    def _linkSliceViews(self) -> None:
        for name in slicer.app.layoutManager().sliceViewNames():
            composite = slicer.app.layoutManager().sliceWidget(name).mrmlSliceCompositeNode()
            composite.SetLinkedControl(True)

    def confirmStopForExit(self) -> bool:
        """Slicer is about to quit while a run is active: may it stop the run? Only asks: the run is
        stopped by cleanup() once the application really quits (its folder keeps the volume)."""
        folder = self._session.run_dir
        return bool(slicer.util.confirmOkCancelDisplay(
            "A reconstruction is still running. Stop it and exit?\n\n"
            f"Its last volume stays in {folder}; Open run folder loads it and Resume continues it.",
            "CTNeRFRecon"))

    def _stopSession(self, reason: str = "the scene was closed") -> None:
        """Scene close or application exit: stop the worker (its run folder keeps the last volume)
        without loading anything more into nodes that are about to go."""
        if self._timer is not None:
            self._timer.stop()
        if self._describeTimer is not None:
            self._describeTimer.stop()  # a summary due in the next moments would start a subprocess
        if self._session is not None and not self._session.state.done:
            try:
                self._session.close(timeout=15, reason=reason)
            except Exception:  # noqa: BLE001 - closing must go on; the worker is killed at interpreter exit
                logging.exception("CTNeRFRecon: stopping the run failed")
        if self._demoJob is not None:
            self._demoJob.worker.stop(timeout=5)
            self._demoJob = None
        if self._commandJob is not None:
            self._commandJob[0].stop()
            self._commandJob = None
        # a check of the engine's Python still on its thread finishes by itself and its result is
        # dropped: the action waiting for it (a run, the demo) was asked for in the scene that is going
        # and must not start later in another one; a scan summary's subprocess is ended
        self._probeJob = None
        if self._describeJob is not None:
            self._describeJob[1].kill()
            self._describeJob = None
        self._session = None
        self._busy = ""


def _slicer_python() -> str:
    """Slicer's Python launcher: PythonSlicer on PATH (Slicer's launcher puts its bin folder there),
    else beside the running executable, as slicer.util.executePythonModule looks for it; outside the
    application (slicer-core, tests) the running interpreter itself. Inside the application
    ``sys.executable`` is SlicerApp-real, which cannot run a Python module: refused with the fix."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    here = pathlib.Path(sys.executable)
    beside = here.with_name("PythonSlicer.exe" if sys.platform == "win32" else "PythonSlicer")
    if beside.is_file():
        return str(beside)
    if here.name.lower().startswith("python"):
        return str(here)
    raise ValueError(f"{here.parent}: Slicer's Python launcher (PythonSlicer) was not found there nor on PATH; "
                     "start Slicer with its own launcher, or choose under Advanced a Python interpreter that "
                     "has the engine's packages")


class _BackgroundCall:
    """``function(*args)`` on a daemon thread; ``done``, ``result`` and ``error`` are read by the GUI
    timer. Only for work that touches no Qt and no MRML and mostly waits (asking a subprocess): Slicer's
    main thread holds Python's GIL whenever it is not running Python (PythonQt runs without thread
    support), so a thread gets the interpreter only in the moments the main thread runs Python, and a
    long C++ call made from a thread (reading a file with SimpleITK) holds the GIL and freezes the GUI
    at its next Python call. Work of that kind runs in a subprocess (EngineCommand)."""

    def __init__(self, function, *args):
        self.args = args
        self.result = None
        self.error = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(function,), name="ctnerf-background", daemon=True)
        self._thread.start()

    def _run(self, function):
        try:
            self.result = function(*self.args)
        except Exception as exc:  # noqa: BLE001 - handed to the GUI thread
            self.error = exc
        finally:
            self._finished.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()


class DemoJob:
    """A demo scan being simulated: the engine's process and the folder it writes."""

    def __init__(self, worker, folder: pathlib.Path):
        self.worker = worker
        self.folder = pathlib.Path(folder)


#
# CTNeRFReconLogic
#


class CTNeRFReconLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, without widgets, so it runs from the Python console and in tests.

    Errors are ValueError with a message that says what to change.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CTNeRFReconParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------------ engine

    @staticmethod
    def engineInterpreter(pythonInterpreter=None) -> str:
        """The Python that runs the engine: the chosen one, else Slicer's PythonSlicer launcher."""
        if _is_set(pythonInterpreter):
            path = pathlib.Path(pythonInterpreter)
            if not path.is_file():
                raise ValueError(f"{path}: the Python interpreter was not found; choose a python executable, or "
                                 "clear the field to use Slicer's own Python")
            return str(path)
        return _slicer_python()

    def workerConfig(self, pythonInterpreter=None):
        from CTNeRFReconLib.slicer_bridge.worker import WorkerConfig

        # the environment Slicer started with: an external Python must not inherit Slicer's own paths
        return WorkerConfig(interpreter=self.engineInterpreter(pythonInterpreter),
                            env=slicer.util.startupEnvironment())

    def missingEnginePackages(self, pythonInterpreter=None, workerConfig=None) -> list:
        """pip names of the engine's packages that its interpreter lacks (torch first). Slicer's own
        Python is checked in place; an external one is asked in a short subprocess, with
        ``workerConfig`` when given (the panel builds it on the GUI thread and calls this on another:
        building it reads Slicer's startup environment, a Qt call)."""
        pipNames = {"torch": "torch", **ENGINE_PACKAGES}
        if _is_set(pythonInterpreter):
            from CTNeRFReconLib.slicer_bridge.worker import missing_modules

            config = workerConfig if workerConfig is not None else self.workerConfig(pythonInterpreter)
            missing = set(missing_modules(config, list(pipNames)))
        else:
            missing = {name for name in pipNames if importlib.util.find_spec(name) is None}
        return [pip for name, pip in pipNames.items() if name in missing]

    def installEnginePackages(self, packages, pythonInterpreter=None) -> None:
        """Into Slicer's Python: torch through the PyTorch extension (PyTorchUtils, a dependency of this
        extension: it picks the build that fits the GPU), the rest with pip. Into an external Python:
        everything with that interpreter's own pip. The caller has asked the user already, so nothing
        here asks again."""
        packages = list(packages)
        if _is_set(pythonInterpreter):
            interpreter = self.engineInterpreter(pythonInterpreter)
            process = slicer.util.launchConsoleProcess([interpreter, "-m", "pip", "install", *packages])
            try:
                slicer.util.logProcessOutput(process)
            except Exception as exc:  # CalledProcessError: pip's own output is in the Python console
                raise ValueError(f"{interpreter}: pip could not install {', '.join(packages)} ({exc}); see the "
                                 "Python console, or install them in that environment yourself") from None
            return
        torchRequirement = ">=2.1"  # pyproject.toml's (Testing/test_extension_metadata.py keeps them equal)
        pyTorchUtils = None
        if "torch" in packages:
            packages.remove("torch")
            try:
                import PyTorchUtils as pyTorchUtils
            except ImportError:
                # never pip's own torch here: on Windows PyPI's wheel is CPU-only
                raise ValueError(
                    "PyTorch is installed through the PyTorch extension, which is missing (a checkout without "
                    "it, or it was uninstalled): install 'PyTorch' with View > Extensions Manager, restart "
                    "Slicer and try again; or choose, under Advanced, a Python interpreter that has PyTorch"
                ) from None
        if pyTorchUtils is not None:
            torch = pyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                  torchVersionRequirement=torchRequirement)
            if torch is None:
                raise ValueError("PyTorch was not installed; install it with the PyTorch Utils module (PyTorch "
                                 "extension), or choose an external Python interpreter that has it")
        if packages:
            slicer.util.pip_install(" ".join(packages))
        # pip ran in another process: the import system's cached directory listings may not show what it
        # wrote yet, and the check that follows (find_spec) must see it
        importlib.invalidate_caches()

    # ----------------------------------------------------------------------------- inputs

    def startDemoData(self, pythonInterpreter=None, small: bool = False, folder=None) -> "DemoJob":
        """Start simulating the demo phantom scan into a new temporary folder (the engine's interpreter
        does it, as it needs torch); poll ``job.worker`` and call :meth:`finishDemoData` once it exited."""
        from CTNeRFReconLib.slicer_bridge.worker import WorkerProcess

        folder = pathlib.Path(folder or tempfile.mkdtemp(prefix="CTNeRFRecon-demo-", dir=slicer.app.temporaryPath))
        args = [str(folder)] + (["--small"] if small else [])
        worker = WorkerProcess(args, None, self.workerConfig(pythonInterpreter),
                               module="CTNeRFReconLib.slicer_bridge.demo_data").start()
        return DemoJob(worker, folder)

    def finishDemoData(self, job: "DemoJob"):
        """Load the reference of a finished demo job into the demo reference node (one node, reused).

        Returns (data folder, reference volume node)."""
        from CTNeRFReconLib.slicer_bridge import volume_nodes as vn

        code = job.worker.wait(timeout=0)
        if code != 0:
            job.worker.stop(timeout=5)
            raise ValueError("making the demo data failed: " + (" | ".join(list(job.worker.log)[-5:]) or
                                                                 "no output from the engine"))
        volume = vn.load_volume_file(job.folder / "reference.nrrd")
        reference = self.roleNode("demo reference")
        if reference is None:
            reference = vn.create_volume_node(slicer.mrmlScene, volume, "demo reference")
            reference.SetAttribute(ROLE_ATTRIBUTE, "demo reference")
        else:
            vn.update_volume_node(reference, volume)
        self.setCTWindow(reference)
        return job.folder, reference

    def loadDemoData(self, pythonInterpreter=None, small: bool = False, folder=None, timeout: float = 600.0):
        """Simulate the demo scan and load its reference, waiting for it (the console and the self-test;
        the panel uses startDemoData and polls). Returns (data folder, reference volume node)."""
        job = self.startDemoData(pythonInterpreter, small, folder)
        if job.worker.wait(timeout=timeout) is None:
            job.worker.stop(timeout=5)
            raise ValueError(f"making the demo data took more than {timeout:.0f} s; see the Python console")
        return self.finishDemoData(job)

    @staticmethod
    def roleNode(role: str, className: str = "vtkMRMLScalarVolumeNode"):
        """The scene's node that the panel made for ``role`` (reused instead of adding another)."""
        for node in slicer.util.getNodesByClass(className):
            if node.GetAttribute(ROLE_ATTRIBUTE) == role:
                return node
        return None

    @staticmethod
    def missingSlicerPackages(needs=tuple(SLICER_PACKAGES)) -> list:
        """pip names of the packages in ``needs`` (import names) that Slicer's own Python lacks."""
        return [SLICER_PACKAGES[name] for name in needs if importlib.util.find_spec(name) is None]

    @staticmethod
    def packagesToRead(dataPath) -> tuple:
        """Import names the panel needs to read this scan in Slicer's Python: PyYAML for a YAML
        description (the file itself, or one in the folder), nothing for every other format."""
        if not _is_set(dataPath):
            return ()
        path = pathlib.Path(dataPath)
        candidates = [path] if path.is_file() else list(path.glob("*.y*ml")) if path.is_dir() else []
        return ("yaml",) if any(c.suffix.lower() in (".yaml", ".yml") for c in candidates) else ()

    @staticmethod
    def setCTWindow(node, preset: str = "auto") -> None:
        from CTNeRFReconLib.slicer_bridge.volume_nodes import set_window

        set_window(node, preset)

    def describeScan(self, dataPath) -> str:
        """One line on what the engine understood of the data (format, views, detector, angles, distances),
        read here (blocks until the scan is read: for the console; the panel uses startDescribe)."""
        from CTNeRFReconLib.slicer_bridge.projections import describe_scan, load_scan_file

        return describe_scan(load_scan_file(self._checkedDataPath(dataPath)))

    def startDescribe(self, dataPath):
        """Read the scan for its one-line summary in a subprocess of Slicer's own Python (the same reading
        as describeScan, without holding the GUI while a large stack loads); poll the returned command,
        then finishDescribe(command.result())."""
        from CTNeRFReconLib.slicer_bridge.commands import info_args

        return self._command(info_args(self._checkedDataPath(dataPath)), None)

    @staticmethod
    def finishDescribe(result: dict) -> str:
        from CTNeRFReconLib.slicer_bridge.projections import describe_summary

        return describe_summary(result)

    def showProjections(self, dataPath):
        """The projection stack as a volume node (one view per axial slice)."""
        from CTNeRFReconLib.slicer_bridge.projections import create_projection_node, load_scan_file

        scan = load_scan_file(self._checkedDataPath(dataPath))
        return create_projection_node(slicer.mrmlScene, scan, "CTNeRFRecon projections",
                                      node=self.roleNode("projections"))

    @staticmethod
    def _checkedDataPath(dataPath) -> pathlib.Path:
        if not _is_set(dataPath):
            raise ValueError("no projection data is chosen; pick a scan file or folder, or press Load demo data")
        path = pathlib.Path(dataPath)
        if not path.exists():
            raise ValueError(f"{path}: the projection data was not found; check the path")
        return path

    # --------------------------------------------------------------------------------- run

    def startReconstruction(self, parameters, runFolder=None, resume: bool = False):
        """Start a run in the background; returns the ReconstructionSession to poll."""
        from CTNeRFReconLib.slicer_bridge.session import (ReconstructionSession, grid_request_fields, method_extra_args,
                                                           parse_view_list)
        from CTNeRFReconLib.slicer_bridge.worker import ReconstructRequest

        data = self._checkedDataPath(parameters.dataPath)
        dropViews = parse_view_list(parameters.leaveOutViews)
        grid = grid_request_fields(parameters.gridChoice, parameters.gridSpacing,
                                   (parameters.gridSizeX, parameters.gridSizeY, parameters.gridSizeZ))
        fromReference = parameters.gridChoice == "reference"
        if fromReference and parameters.referenceVolume is None:
            raise ValueError("the output grid is the reference's, but no reference CT is selected; choose one "
                             "under Inputs, or another output grid")
        if resume and runFolder is None:
            raise ValueError("there is no earlier run to resume in this session; press Start")
        if runFolder is None:
            if _is_set(parameters.runFolder):
                runFolder = pathlib.Path(parameters.runFolder) / time.strftime("run-%Y%m%d-%H%M%S")
            else:
                base = pathlib.Path(slicer.app.temporaryPath) / "CTNeRFRecon"
                base.mkdir(parents=True, exist_ok=True)
                runFolder = pathlib.Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=base))
        extra = method_extra_args(parameters.method, parameters.timeLimit, parameters.tableBeyondView)
        request = ReconstructRequest(
            data=data, out=pathlib.Path(runFolder), method=parameters.method, preset=parameters.preset,
            device=parameters.device, seed=parameters.seed, resume=resume, drop_views=dropViews,
            iterations=parameters.iterations or None, snapshot_every=parameters.snapshotEvery or None,
            extra_args=extra, **grid)
        options = self.sessionOptions(parameters, grid_from_reference=fromReference)
        session = ReconstructionSession(slicer.mrmlScene, request, self.workerConfig(parameters.pythonInterpreter),
                                        options, reference_node=parameters.referenceVolume,
                                        output_node=parameters.outputVolume)
        return session.start()

    @staticmethod
    def sessionOptions(parameters, **overrides):
        from CTNeRFReconLib.slicer_bridge.session import SessionOptions
        from CTNeRFReconLib.slicer_bridge.volume_nodes import Units

        fields = dict(name=parameters.outputVolume.GetName() if parameters.outputVolume else "CTNeRFRecon",
                      units=Units.HU if parameters.showHU else Units.MU, keep_snapshots=parameters.keepSnapshots)
        fields.update(overrides)
        return SessionOptions(**fields)

    def resumeReconstruction(self, previous, parameters):
        """Continue an earlier run (of this session, or opened with openRun) in its own folder, with the
        settings it was started with, streaming into its output node."""
        from CTNeRFReconLib.slicer_bridge.session import ReconstructionSession

        if previous is None:
            raise ValueError("there is no earlier run to resume; press Start, or Open run folder to load one")
        request = previous.resume_request()
        options = self.sessionOptions(parameters, name=previous.options.name, units=previous.options.units)
        session = ReconstructionSession(slicer.mrmlScene, request, self.workerConfig(parameters.pythonInterpreter),
                                        options, reference_node=parameters.referenceVolume,
                                        output_node=previous.output_node)
        return session.start()

    def openRun(self, runFolder, parameters=None):
        """Load an earlier run folder (volume, loss curve, scores) as a finished session that Resume continues."""
        from CTNeRFReconLib.slicer_bridge.session import open_run

        config = self.workerConfig(parameters.pythonInterpreter if parameters is not None else None)
        options = self.sessionOptions(parameters) if parameters is not None else None
        if options is not None:
            options.name = pathlib.Path(runFolder).name
        return open_run(slicer.mrmlScene, runFolder, config, options,
                        reference_node=parameters.referenceVolume if parameters is not None else None)

    # ---------------------------------------------------------------------------- field tools

    def _command(self, args, pythonInterpreter):
        from CTNeRFReconLib.slicer_bridge.commands import EngineCommand

        return EngineCommand(args, self.workerConfig(pythonInterpreter)).start()

    @staticmethod
    def _checkedRunFolder(runFolder) -> pathlib.Path:
        if runFolder is None or not (pathlib.Path(runFolder) / "run.json").is_file():
            raise ValueError("there is no run to work on; run a reconstruction, or Open run folder to load one")
        return pathlib.Path(runFolder)

    def startSurface(self, runFolder, threshold: str = "auto", pythonInterpreter=None):
        """Start the engine's ``surface`` on a run (its field, else its volume); finishSurface loads it."""
        from CTNeRFReconLib.slicer_bridge.commands import surface_args

        run = self._checkedRunFolder(runFolder)
        label = "".join(c if c.isalnum() else "_" for c in threshold)
        return self._command(surface_args(run, run / f"surface-{label}.vtp", threshold), pythonInterpreter)

    def finishSurface(self, result: dict) -> str:
        """The surface as a model node in RAS (one node per threshold, refilled when made again)."""
        from CTNeRFReconLib.slicer_bridge import field_tools
        from CTNeRFReconLib.slicer_bridge.commands import result_path

        path = result_path(result)
        role = f"surface {path.stem}"
        node = self.roleNode(role, "vtkMRMLModelNode")
        node = field_tools.model_node_from_file(slicer.mrmlScene, path, name=f"CTNeRFRecon {path.stem}", node=node)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        return f"{path.name}: {result.get('triangles', '?')} triangles at threshold {result.get('threshold', '?')}"

    def placeExportBox(self, runFolder):
        """An ROI box in the middle of the run's output grid, half its size (the one export box of the
        scene, moved back there when placed again)."""
        import json

        from CTNeRFReconLib.slicer_bridge import field_tools

        run = self._checkedRunFolder(runFolder)
        grid = json.loads((run / "run.json").read_text(encoding="utf-8")).get("grid") or {}
        try:
            shape, spacing, origin = (grid[k] for k in ("shape_xyz", "spacing_xyz", "origin_xyz"))
            size = [n * d for n, d in zip(shape, spacing)]
            centre = [o + (n - 1) * d / 2 for o, n, d in zip(origin, shape, spacing)]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{run / 'run.json'}: field 'grid': missing or unreadable. Fix: open a run folder "
                             "written by CTNeRFRecon") from None
        node = field_tools.roi_node_from_box(slicer.mrmlScene, centre, [s / 2 for s in size],
                                             node=self.roleNode("export box", "vtkMRMLMarkupsROINode"))
        node.SetAttribute(ROLE_ATTRIBUTE, "export box")
        return node

    def startExport(self, runFolder, spacing: float, pythonInterpreter=None):
        """Start the engine's ``export`` of the export box at ``spacing`` mm; finishExport loads it."""
        from CTNeRFReconLib.slicer_bridge import field_tools
        from CTNeRFReconLib.slicer_bridge.commands import export_args

        run = self._checkedRunFolder(runFolder)
        box = self.roleNode("export box", "vtkMRMLMarkupsROINode")
        if box is None:
            raise ValueError("there is no export box; press Place box and move it over the region to export")
        centre, size = field_tools.box_from_roi_node(box)
        out = run / time.strftime(f"region-%Y%m%d-%H%M%S-{spacing:g}mm.nrrd")
        return self._command(export_args(run, out, centre, size, spacing), pythonInterpreter)

    def finishExport(self, result: dict) -> str:
        """The exported region as a new volume node (each export is kept)."""
        from CTNeRFReconLib.slicer_bridge import volume_nodes as vn
        from CTNeRFReconLib.slicer_bridge.commands import result_path

        path = result_path(result)
        node = vn.create_volume_node(slicer.mrmlScene, vn.load_volume_file(path), f"CTNeRFRecon {path.stem}")
        self.setCTWindow(node)
        slicer.util.setSliceViewerLayers(background=node, fit=True)
        return f"{path.name}: {result.get('note', 'evaluated')}"

    def startProjectionCheck(self, runFolder, view=None, pythonInterpreter=None):
        """Start the engine's ``check`` (measured vs rendered projection, per-view residuals)."""
        from CTNeRFReconLib.slicer_bridge.commands import check_args

        run = self._checkedRunFolder(runFolder)
        return self._command(check_args(run, run / "projection_check.png", view), pythonInterpreter)

    def finishProjectionCheck(self, result: dict) -> str:
        """The check's picture as an image node (in the slice views) and the residuals as a table."""
        from CTNeRFReconLib.slicer_bridge import field_tools
        from CTNeRFReconLib.slicer_bridge.commands import result_path

        picture = field_tools.projection_check_node(
            slicer.mrmlScene, result_path(result), node=self.roleNode("projection check", "vtkMRMLVectorVolumeNode"))
        picture.SetAttribute(ROLE_ATTRIBUTE, "projection check")
        table = field_tools.residual_table_node(slicer.mrmlScene, result,
                                                node=self.roleNode("projection residuals", "vtkMRMLTableNode"))
        table.SetAttribute(ROLE_ATTRIBUTE, "projection residuals")
        slicer.util.setSliceViewerLayers(background=picture, foreground=None, fit=True)
        return f"view {result.get('view')} at {result.get('angle_deg', 0):.1f} deg"

    @staticmethod
    def metricsRows(tableNode) -> dict:
        from CTNeRFReconLib.slicer_bridge.tables import read_key_value_table

        return read_key_value_table(tableNode)

    def compare(self, referenceNode, outputNode, session=None):
        """Score the output against the reference; returns (metric rows, difference node, metrics table node)."""
        from CTNeRFReconLib.slicer_bridge.compare import compare_nodes
        from CTNeRFReconLib.slicer_bridge.tables import read_key_value_table

        if session is not None and session.output_node is outputNode and session.reference_node is referenceNode:
            session.compare()
            return (read_key_value_table(session.metrics_table_node), session.difference_node,
                    session.metrics_table_node)
        difference = self.roleNode("difference")
        _, difference, table = compare_nodes(slicer.mrmlScene, referenceNode, outputNode, difference_node=difference,
                                             table_node=getattr(self, "_comparisonTable", None))
        self._comparisonTable = table
        return read_key_value_table(table), difference, table

    # ----------------------------------------------------------------------------- display

    @staticmethod
    def showComparison(outputNode, overlayNode, opacity: float) -> None:
        """The reconstruction under the overlay (reference or difference) in every slice view, linked."""
        from CTNeRFReconLib.slicer_bridge.views import show_layers

        if overlayNode is None:
            raise ValueError("there is nothing to show over the reconstruction; choose a reference CT, or press "
                             "Compare with reference to make the difference volume")
        show_layers(slicer.mrmlScene, outputNode, overlayNode, opacity)

    @staticmethod
    def showMonitorLayout(chartNode=None) -> None:
        """The layout with the 3D view, the loss chart and the three slice views at once, the chart in it."""
        from CTNeRFReconLib.slicer_bridge import layouts

        layouts.select_layout(slicer.mrmlScene, layouts.MONITOR_LAYOUT_ID)
        if chartNode is not None:
            layouts.show_chart(slicer.mrmlScene, chartNode)
            selectionNode = slicer.app.applicationLogic().GetSelectionNode()
            selectionNode.SetActivePlotChartID(chartNode.GetID())
            slicer.app.applicationLogic().PropagatePlotChartSelection()

    @staticmethod
    def showChart(chartNode) -> int:
        """Show a plot chart in the plot views of the current layout (none: nothing changes)."""
        from CTNeRFReconLib.slicer_bridge import layouts

        return layouts.show_chart(slicer.mrmlScene, chartNode)

    @staticmethod
    def showSideBySide(outputNode, referenceNode, differenceNode=None) -> None:
        """Reconstruction | reference | difference in a row of linked axial views."""
        from CTNeRFReconLib.slicer_bridge import layouts

        layouts.select_layout(slicer.mrmlScene, layouts.SIDE_BY_SIDE_LAYOUT_ID)
        slicer.app.processEvents()  # the layout manager makes the row's views
        if layouts.show_side_by_side(slicer.mrmlScene, outputNode, referenceNode, differenceNode) == 0:
            raise ValueError("the side-by-side views were not created; choose the layout from the View menu")
        slicer.util.resetSliceViews()

    @staticmethod
    def setOverlayOpacity(opacity: float) -> None:
        from CTNeRFReconLib.slicer_bridge.views import set_overlay_opacity

        set_overlay_opacity(slicer.mrmlScene, opacity)

    @staticmethod
    def showVolumeRendering(volumeNode, show: bool = True):
        """Show (or hide) the volume rendered in the 3D views, with transfer functions made for attenuation
        values (Slicer's presets are in HU, and its window-following renders an opaque shell with the
        noise of the air): they are rebuilt from the slice window whenever it changes, so the rendering
        stays right while the volume updates in place."""
        from CTNeRFReconLib.slicer_bridge.rendering import show_attenuation_rendering

        return show_attenuation_rendering(slicer.modules.volumerendering.logic(), volumeNode, show)

    @staticmethod
    def showTable(tableNode) -> None:
        """Show a table node in a table view (switching to a layout with one; from the module's monitor,
        the monitor with a table row, so the loss chart stays on screen)."""
        from CTNeRFReconLib.slicer_bridge import layouts

        layoutManager = slicer.app.layoutManager()
        layouts.register_layouts(layoutManager.layoutLogic().GetLayoutNode())
        layoutManager.setLayout(layouts.layout_with_table(layoutManager.layout,
                                                          slicer.modules.tables.logic().GetLayoutWithTable))
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetActiveTableID(tableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    @staticmethod
    def metricsSummary(rows: dict) -> str:
        """The headline scores, for the panel."""
        wanted = [("psnr", "PSNR {} dB"), ("ssim", "SSIM {}"), ("engine.psnr", "PSNR {} dB (engine)"),
                  ("engine.ssim", "SSIM {} (engine)")]
        parts = []
        for key, text in wanted:
            if key in rows:
                try:
                    parts.append(text.format(f"{float(rows[key]):.4g}"))
                except ValueError:
                    parts.append(text.format(rows[key]))
        if "psnr" in rows and "ssim" not in rows:
            parts.append("SSIM n/a (scikit-image is not installed in Slicer's Python)")
        return "   ".join(parts) or "no scores (no reference)"

    @staticmethod
    def failureHint(kind) -> str:
        return {
            "missing_dependency": "Install the engine's packages (PyTorch first), or choose a Python interpreter "
                                  "that has them under Advanced.",
            "out_of_memory": "Choose a larger voxel size or the preview quality under Reconstruction.",
            "bad_input": "Check the projection data (the message names the file and field).",
        }.get(kind or "", "")


#
# CTNeRFReconTest
#


class CTNeRFReconTest(ScriptedLoadableModuleTest):
    """Run with the module's Reload and Test button, or by ctest (slicer_add_python_unittest, which
    runs the test_* methods).

    Two parts. test_CTNeRFRecon_without_torch needs no PyTorch and runs everywhere, the extension
    build machines included (they have none): the library is found the way an installed extension or
    a checkout finds it, the engine's Python starts and finds the library too, and volumes go into the
    scene, are compared and shown. test_CTNeRFRecon_demo_fdk_cpu reconstructs the small demo phantom
    through the worker; it needs the engine's packages (PyTorch first) and is skipped, saying which
    are missing, where the engine's Python lacks them.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import unittest

        self.setUp()
        self.test_CTNeRFRecon_without_torch()
        self.setUp()
        try:
            self.test_CTNeRFRecon_demo_fdk_cpu()
        except unittest.SkipTest as exc:
            self.delayDisplay(f"Skipped the reconstruction test: {exc}")

    def test_CTNeRFRecon_without_torch(self):
        """Library path, the engine's Python, volume nodes, comparison and views: no PyTorch needed."""
        import numpy as np

        import CTNeRFReconLib
        from CTNeRFReconLib.data import Volume
        from CTNeRFReconLib.geometry import VolumeGrid
        from CTNeRFReconLib.phantom import shepp_logan_3d, voxelize
        from CTNeRFReconLib.slicer_bridge import volume_nodes as vn
        from CTNeRFReconLib.slicer_bridge.worker import LIB_ROOT, missing_modules

        self.delayDisplay("Finding the library and the engine's Python")
        here = pathlib.Path(__file__).resolve().parent
        self.assertIsNotNone(LIBRARY_ROOT, "CTNeRFReconLib was not found beside the module or above it")
        root = pathlib.Path(LIBRARY_ROOT).resolve()
        self.assertIn(root, (here, here.parent))  # installed extension, checkout
        self.assertEqual(pathlib.Path(CTNeRFReconLib.__file__).resolve().parent, root / "CTNeRFReconLib")
        self.assertEqual(LIB_ROOT, root, "the worker would put another CTNeRFReconLib on the engine's PYTHONPATH")
        logic = CTNeRFReconLogic()
        self.assertEqual(missing_modules(logic.workerConfig(), ["CTNeRFReconLib", "numpy"]), [],
                         f"the engine's Python ({logic.engineInterpreter()}) does not find the library")
        missing = logic.missingEnginePackages()
        self.assertTrue(set(missing) <= {"torch", *ENGINE_PACKAGES.values()}, missing)
        with self.assertRaises(ValueError):
            logic.describeScan("")

        self.delayDisplay("A phantom and a noisy copy into the scene, compared")
        grid = VolumeGrid((24, 20, 16), (4.0, 4.0, 4.0), (-46.0, -38.0, -30.0))
        truth = voxelize(shepp_logan_3d(), grid)
        noisy = truth + np.random.default_rng(0).normal(0.0, 5e-4, truth.shape).astype(np.float32)
        reference = vn.create_volume_node(slicer.mrmlScene, Volume(truth, grid), "test reference")
        output = vn.create_volume_node(slicer.mrmlScene, Volume(noisy, grid), "test output")
        self.assertEqual(output.GetImageData().GetDimensions(), grid.shape_xyz)
        np.testing.assert_allclose(vn.volume_from_node(output).array, noisy, rtol=1e-6, atol=1e-7)
        rows, difference, table = logic.compare(reference, output)
        self.assertGreater(float(rows["psnr"]), 20.0)
        self.assertIsNotNone(difference.GetImageData())
        self.assertIn("PSNR", logic.metricsSummary(rows))

        self.delayDisplay("The reference over the output in the slice views, then volume rendering")
        self._checkViews(logic, output, reference)
        self._checkLayouts(logic, output, reference, difference)
        self.delayDisplay("Test passed")

    def _checkLayouts(self, logic, output, reference, difference):
        """The module's two layouts, as the application's layout manager builds them."""
        from CTNeRFReconLib.slicer_bridge import layouts

        layoutManager = slicer.app.layoutManager()
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()
        for layoutId in layouts.LAYOUTS:  # registered when Slicer started (registerLayouts), before any use
            self.assertTrue(layoutNode.IsLayoutDescription(layoutId), layoutId)
        logic.showSideBySide(output, reference, difference)
        for name, node in zip(layouts.SIDE_BY_SIDE_VIEWS, (output, reference, difference)):
            composite = layoutManager.sliceWidget(name).mrmlSliceCompositeNode()
            self.assertEqual(composite.GetBackgroundVolumeID(), node.GetID())
        logic.showMonitorLayout()
        slicer.app.processEvents()
        self.assertEqual(layoutManager.layout, layouts.MONITOR_LAYOUT_ID)
        self.assertGreaterEqual(layoutManager.threeDViewCount, 1)  # Four-Up Plot would have none
        self.assertGreaterEqual(layoutManager.plotViewCount, 1)
        self.assertIsNotNone(layoutManager.sliceWidget("Red"))
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "CTNeRFRecon test table")
        logic.showTable(table)  # from the monitor: its table row, the chart and the 3D view stay
        slicer.app.processEvents()
        self.assertEqual(layoutManager.layout, layouts.MONITOR_TABLE_LAYOUT_ID)
        self.assertGreaterEqual(layoutManager.tableViewCount, 1)
        self.assertGreaterEqual(layoutManager.plotViewCount, 1)
        self.assertGreaterEqual(layoutManager.threeDViewCount, 1)
        slicer.mrmlScene.RemoveNode(table)

    def _checkViews(self, logic, output, overlay):
        logic.showComparison(output, overlay, 0.5)
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetBackgroundVolumeID(), output.GetID())
        self.assertEqual(composite.GetForegroundVolumeID(), overlay.GetID())
        self.assertTrue(composite.GetLinkedControl())
        logic.setOverlayOpacity(1.0)
        self.assertEqual(composite.GetForegroundOpacity(), 1.0)
        displayNode = logic.showVolumeRendering(output, True)
        self.assertTrue(displayNode.GetVisibility())
        self.assertFalse(logic.showVolumeRendering(output, False).GetVisibility())

    def test_CTNeRFRecon_demo_fdk_cpu(self):
        """The small demo phantom through the whole module path on CPU: data, run, volume, scores.
        Skipped where the engine's Python lacks its packages (the extension build machines have no PyTorch)."""
        from CTNeRFReconLib.slicer_bridge.session import SessionState
        from CTNeRFReconLib.slicer_bridge.tables import read_key_value_table

        logic = CTNeRFReconLogic()
        missing = logic.missingEnginePackages()
        if missing:
            reason = (f"the engine's Python ({logic.engineInterpreter()}) lacks {', '.join(missing)}; install "
                      "them (Load demo data or Start offers to) to run the reconstruction test")
            logging.warning("CTNeRFReconTest: reconstruction skipped: %s", reason)
            self.skipTest(reason)

        self.delayDisplay("Making the small demo data")
        folder, reference = logic.loadDemoData(small=True)
        self.assertTrue((folder / "projections.mha").exists() or any(folder.glob("*.mha")))
        command = logic.startDescribe(folder)  # the panel's summary: `info` in a subprocess of Slicer's Python
        self.assertEqual(logic.finishDescribe(command.wait(120)), logic.describeScan(folder))

        parameters = logic.getParameterNode()
        parameters.dataPath = str(folder)
        parameters.referenceVolume = reference
        parameters.method = "fdk"
        parameters.device = "cpu"
        parameters.preset = "preview"
        parameters.gridChoice = "reference"

        self.delayDisplay("Reconstructing with FDK on CPU, on the reference's grid")
        session = logic.startReconstruction(parameters)
        deadline = time.monotonic() + 300
        while not session.state.done and time.monotonic() < deadline:
            session.poll()
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertEqual(session.state, SessionState.FINISHED, session.message)
        self.assertIsNotNone(session.output_node)
        self.assertIsNotNone(session.output_node.GetImageData())
        rows = read_key_value_table(session.metrics_table_node)
        self.assertIn("psnr", rows)
        self.assertGreater(float(rows["psnr"]), 15.0)
        self.assertIsNotNone(session.difference_node)
        self.assertEqual(session.output_node.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions())

        self.delayDisplay("Linking the reference over the reconstruction, then volume rendering")
        self._checkViews(logic, session.output_node, reference)

        self.delayDisplay("The run folder opened again, as after a restart of Slicer")
        opened = logic.openRun(session.run_dir, parameters)
        self.assertEqual(opened.state, SessionState.FINISHED, opened.message)
        self.assertEqual(opened.output_node.GetImageData().GetDimensions(),
                         session.output_node.GetImageData().GetDimensions())
        self.assertFalse(opened.resumable)  # FDK writes no checkpoint
        self.delayDisplay("Test passed")
