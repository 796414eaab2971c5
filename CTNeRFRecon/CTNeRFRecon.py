"""CTNeRFRecon: sparse-view cone-beam CT reconstruction in 3D Slicer.

The module is a thin GUI over CTNeRFReconLib: the engine runs in a subprocess (Slicer's Python or
an external one with CUDA PyTorch) and its growing volume streams into one scalar volume node
through CTNeRFReconLib.slicer_bridge. Four classes, as in Slicer's scripted-module template:
Module (metadata), Widget (GUI only), Logic (no widgets; raises ValueError with readable messages),
Test (a tiny CPU reconstruction of the demo phantom).
"""
from __future__ import annotations

import importlib.util
import logging
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

ENGINE_PACKAGES = {"numpy": "numpy", "scipy": "scipy", "SimpleITK": "SimpleITK", "skimage": "scikit-image",
                   "yaml": "pyyaml", "psutil": "psutil", "tqdm": "tqdm", "nrrd": "pynrrd", "matplotlib": "matplotlib",
                   "ninja": "ninja"}
"""Import name -> pip name of what the engine needs besides torch (in the interpreter that runs it)."""

POLL_INTERVAL_MS = 250


#
# CTNeRFRecon
#


class CTNeRFRecon(ScriptedLoadableModule):
    """Module metadata; Slicer creates it once at start-up."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CTNeRFRecon"
        self.parent.categories = ["Reconstruction"]
        self.parent.dependencies = []
        self.parent.contributors = ["The CTNeRFRecon authors"]
        self.parent.helpText = (
            "Reconstruct a CT volume from a sparse set of cone-beam X-ray projections with a deep-prior "
            "TensoRF field (or FDK), watch it improve live, and compare it with a reference CT. "
            "Start with <b>Load demo data</b>. See the "
            "<a href='https://github.com/CTNeRFRecon/CTNeRFRecon/blob/main/README.md#slicer-module'>documentation</a>.")
        self.parent.acknowledgementText = (
            "Builds on the ideas of TensoRF, ZeroRF, NAF and R2-Gaussian, and on RTK and TIGRE for geometry "
            "conventions.")


#
# Parameter node
#


@parameterNodeWrapper
class CTNeRFReconParameterNode:
    """The panel's state, saved with the scene. Each field is bound to the widget whose
    SlicerParameterName property names it (Resources/UI/CTNeRFRecon.ui)."""

    dataPath: pathlib.Path
    """Scan file or folder."""
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
    runFolder: pathlib.Path
    """Empty: a new folder under Slicer's temporary folder for each run."""
    pythonInterpreter: pathlib.Path
    """Empty: Slicer's own Python (PythonSlicer)."""
    volumeRendering: bool = False
    """Also show the output volume rendered in the 3D view (it follows the slice window/level)."""
    overlay: Annotated[str, Choice(["reference", "difference"])] = "reference"
    """What the slice views show over the reconstruction when comparing."""
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    """Opacity of the overlay: 0 shows the reconstruction only, 1 the overlay only."""


def _is_set(path) -> bool:
    return path is not None and str(path) not in ("", ".")


#
# CTNeRFReconWidget
#


class CTNeRFReconWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Slicer calls setup() once when the module is first shown, enter()/exit() each
    time it is shown/hidden, cleanup() when the application closes or the module is reloaded, and
    onSceneStartClose()/onSceneEndClose() around File > Close Scene."""

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
        self._describedPath = None
        self._overlayShown = False
        self._timer = None

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

        self.ui.loadDemoButton.connect("clicked(bool)", self.onLoadDemo)
        self.ui.showProjectionsButton.connect("clicked(bool)", self.onShowProjections)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.volumeRenderingCheckBox.connect("toggled(bool)", self.onVolumeRenderingToggled)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.showOverlayButton.connect("clicked(bool)", self.onShowOverlay)
        self.ui.flickButton.connect("clicked(bool)", self.onFlick)
        self.ui.showTableButton.connect("clicked(bool)", self.onShowTable)
        self.ui.overlayComboBox.connect("currentIndexChanged(int)", self.onOverlayChanged)
        self.ui.overlayOpacitySlider.connect("valueChanged(double)", self.onOverlayOpacityChanged)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTimer)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Application exit or module reload: stop the worker, drop observers."""
        self._stopSession("Slicer is closing the module")
        self.removeObservers()

    def enter(self) -> None:
        """The module is shown: make sure the parameter node exists and is bound."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """The module is hidden: unbind the GUI (the run goes on; the timer keeps polling)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """The scene is about to close: stop the run before its nodes go away (the session also
        stops itself on this event; this drops the panel's hold on it)."""
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
        """Bind the GUI to a parameter node (two-way, through connectGui)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateScanInfo()
        self._updateButtons()

    def _updateScanInfo(self) -> None:
        """Summarise the projection data whenever its path changes (errors go into the label)."""
        p = self._parameterNode
        path = str(p.dataPath) if p is not None and _is_set(p.dataPath) else None
        if path == self._describedPath:
            return
        self._describedPath = path
        if path is None or not pathlib.Path(path).exists():
            self.ui.scanInfoLabel.text = ""
            return
        try:
            with slicer.util.WaitCursor():
                self.ui.scanInfoLabel.text = self.logic.describeScan(path)
        except Exception as exc:  # any unreadable input: say why, next to the path
            self.ui.scanInfoLabel.text = f"Not readable as projection data: {exc}"

    def _updateButtons(self) -> None:
        p = self._parameterNode
        running = self._session is not None and not self._session.state.done
        hasData = p is not None and _is_set(p.dataPath)
        self.ui.startButton.enabled = hasData and not running
        self.ui.cancelButton.enabled = running
        self.ui.resumeButton.enabled = (not running and self._lastRunFolder is not None
                                        and p is not None and p.method == "nerf")
        self.ui.showProjectionsButton.enabled = hasData
        self.ui.loadDemoButton.enabled = not running
        custom = p is not None and p.gridChoice == "custom"
        for widget in (self.ui.gridSpacingSpinBox, self.ui.gridSizeXSpinBox, self.ui.gridSizeYSpinBox,
                       self.ui.gridSizeZSpinBox):
            widget.enabled = custom
        hasOutput = p is not None and p.outputVolume is not None and p.outputVolume.GetImageData() is not None
        self.ui.compareButton.enabled = hasOutput and p.referenceVolume is not None and not running
        canOverlay = hasOutput and self._overlayNode() is not None
        self.ui.showOverlayButton.enabled = canOverlay
        self.ui.flickButton.enabled = canOverlay
        self.ui.showTableButton.enabled = self._metricsTableNode is not None

    def _overlayNode(self):
        """The volume chosen to go over the reconstruction: the reference or the difference."""
        p = self._parameterNode
        if p is None:
            return None
        return self._differenceNode if p.overlay == "difference" else p.referenceVolume

    # -------------------------------------------------------------------------------- actions

    def onLoadDemo(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to make the demo data.", waitCursor=True):
            if not self._ensureEngine():
                return
            folder, reference = self.logic.loadDemoData(self._parameterNode.pythonInterpreter)
            self._parameterNode.dataPath = folder
            self._parameterNode.referenceVolume = reference

    def onShowProjections(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to show the projections.", waitCursor=True):
            node = self.logic.showProjections(self._parameterNode.dataPath)
            slicer.util.setSliceViewerLayers(background=node, foreground=None, fit=True)

    def onStart(self) -> None:
        self._start(resume=False)

    def onResume(self) -> None:
        self._start(resume=True)

    def _start(self, resume: bool) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to start the reconstruction.", waitCursor=True):
            if not self._ensureEngine():
                return
            self._session = self.logic.startReconstruction(
                self._parameterNode, runFolder=self._lastRunFolder if resume else None, resume=resume)
            self._lastRunFolder = self._session.run_dir
            self._shownOutput = self._shownChart = False
            self._differenceNode = self._metricsTableNode = None
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = self._session.message
            self.ui.metricsLabel.text = ""
            self._timer.start()
        self._updateButtons()

    def onCancel(self) -> None:
        if self._session is not None:
            self._session.cancel()
            self.ui.statusLabel.text = self._session.message
        self._updateButtons()

    def onVolumeRenderingToggled(self, checked: bool) -> None:
        node = self._parameterNode.outputVolume if self._parameterNode else None
        if node is not None and node.GetImageData() is not None:
            with slicer.util.tryWithErrorDisplay("Failed to change the volume rendering.", waitCursor=True):
                self.logic.showVolumeRendering(node, checked)

    def onCompare(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to compare with the reference.", waitCursor=True):
            p = self._parameterNode
            rows, self._differenceNode, self._metricsTableNode = self.logic.compare(
                p.referenceVolume, p.outputVolume, self._session)
            self.ui.metricsLabel.text = self.logic.metricsSummary(rows)
            self._showOverlay()
        self._updateButtons()

    def onShowOverlay(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to show the comparison.", waitCursor=True):
            self._showOverlay()

    def _showOverlay(self) -> None:
        p = self._parameterNode
        self.logic.showComparison(p.outputVolume, self._overlayNode(), p.overlayOpacity)
        self._overlayShown = True

    def onOverlayChanged(self, index: int) -> None:
        """Another overlay chosen: swap it in when a comparison is on view (never just on opening the panel)."""
        p = self._parameterNode
        if self._overlayShown and p is not None and p.outputVolume is not None and self._overlayNode() is not None:
            self.onShowOverlay()
        self._updateButtons()

    def onOverlayOpacityChanged(self, value: float) -> None:
        """The opacity slider moves the overlay of every slice view while a comparison is on view."""
        if self._overlayShown:
            self.logic.setOverlayOpacity(value)

    def onFlick(self) -> None:
        """Swap between the reconstruction alone and the overlay alone (opacity 0 <-> 1)."""
        from CTNeRFReconLib.slicer_bridge.views import flicked

        p = self._parameterNode
        if not self._overlayShown:
            self._showOverlay()
        p.overlayOpacity = flicked(p.overlayOpacity)  # the slider follows
        self.logic.setOverlayOpacity(p.overlayOpacity)

    def onShowTable(self) -> None:
        if self._metricsTableNode is not None:
            self.logic.showTable(self._metricsTableNode)

    def onPollTimer(self) -> None:
        """Drain the worker's events (never blocks) and show them."""
        session = self._session
        if session is None:
            self._timer.stop()
            return
        try:
            session.poll()
        except Exception as exc:  # a volume that cannot be read: stop the run, say why
            logging.exception("CTNeRFRecon: applying a worker event failed")
            session.stop(timeout=10)
            self._timer.stop()
            slicer.util.errorDisplay(f"The reconstruction could not be shown: {exc}")
            self._updateButtons()
            return
        self._showProgress(session)
        if session.chart_node is not None and not self._shownChart:
            self._shownChart = True  # the loss curve from its first point; it redraws as rows arrive
            slicer.modules.plots.logic().ShowChartInLayout(session.chart_node)
        if session.output_node is not None and not self._shownOutput:
            self._shownOutput = True
            self._parameterNode.outputVolume = session.output_node
            slicer.util.setSliceViewerLayers(background=session.output_node, fit=True)
            self._linkSliceViews()
            if self._parameterNode.volumeRendering:
                self.logic.showVolumeRendering(session.output_node, True)
        if session.state.done:
            self._timer.stop()
            self._onRunDone(session)
        self._updateButtons()

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
        from CTNeRFReconLib.slicer_bridge.tables import read_key_value_table

        self.ui.progressBar.maximum = 1000
        self.ui.progressBar.value = 1000 if session.state is SessionState.FINISHED else self.ui.progressBar.value
        self.ui.statusLabel.text = session.message
        if session.metrics_table_node is not None:
            self._metricsTableNode = session.metrics_table_node
            self.ui.metricsLabel.text = self.logic.metricsSummary(read_key_value_table(session.metrics_table_node))
        if session.difference_node is not None:
            self._differenceNode = session.difference_node
        if session.output_node is not None and self._overlayNode() is not None:
            self._showOverlay()
        if session.state is SessionState.FAILED:
            hint = self.logic.failureHint(session.failure_kind)
            slicer.util.errorDisplay(f"The reconstruction failed: {session.message}" + (f"\n\n{hint}" if hint else ""))

    def _linkSliceViews(self) -> None:
        for name in slicer.app.layoutManager().sliceViewNames():
            composite = slicer.app.layoutManager().sliceWidget(name).mrmlSliceCompositeNode()
            composite.SetLinkedControl(True)

    def _stopSession(self, reason: str = "the scene was closed") -> None:
        """Scene close or application exit: stop the worker (its run folder keeps the last volume)
        without loading anything more into nodes that are about to go."""
        if self._timer is not None:
            self._timer.stop()
        if self._session is not None:
            self._session.close(timeout=15, reason=reason)
        self._session = None

    def _ensureEngine(self) -> bool:
        """At first use (never at import): offer to install what the engine needs in the Python that
        runs it (Slicer's own, or the external one chosen under Advanced)."""
        interpreter = self._parameterNode.pythonInterpreter
        external = _is_set(interpreter)
        with slicer.util.WaitCursor():
            missing = self.logic.missingEnginePackages(interpreter)
        if not missing:
            return True
        names = ", ".join(missing)
        where = f"the Python at {interpreter}" if external else "Slicer"
        how = ("They are installed with that interpreter's pip; for a CUDA build of PyTorch there, follow "
               "pytorch.org instead." if external else
               "PyTorch comes from the PyTorch extension when it is installed, which picks the build that fits "
               "your GPU.")
        if not slicer.util.confirmOkCancelDisplay(
                f"The reconstruction engine needs these Python packages in {where}: {names}.\n\n"
                f"Install them now? {how} This can take several minutes.", "CTNeRFRecon setup"):
            return False
        with slicer.util.tryWithErrorDisplay("Failed to install the engine's packages.", waitCursor=True):
            self.logic.installEnginePackages(missing, interpreter)
            return True
        return False


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
        return shutil.which("PythonSlicer") or sys.executable

    def workerConfig(self, pythonInterpreter=None):
        from CTNeRFReconLib.slicer_bridge.worker import WorkerConfig

        # the environment Slicer started with: an external Python must not inherit Slicer's own paths
        return WorkerConfig(interpreter=self.engineInterpreter(pythonInterpreter),
                            env=slicer.util.startupEnvironment())

    def missingEnginePackages(self, pythonInterpreter=None) -> list:
        """pip names of the engine's packages that its interpreter lacks (torch first). Slicer's own
        Python is checked in place; an external one is asked in a short subprocess."""
        pipNames = {"torch": "torch", **ENGINE_PACKAGES}
        if _is_set(pythonInterpreter):
            from CTNeRFReconLib.slicer_bridge.worker import missing_modules

            missing = set(missing_modules(self.workerConfig(pythonInterpreter), list(pipNames)))
        else:
            missing = {name for name in pipNames if importlib.util.find_spec(name) is None}
        return [pip for name, pip in pipNames.items() if name in missing]

    def installEnginePackages(self, packages, pythonInterpreter=None) -> None:
        """Into Slicer's Python: torch through the PyTorch extension when present (GPU-matched build),
        the rest with pip. Into an external Python: everything with that interpreter's own pip."""
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
        if "torch" in packages:
            packages.remove("torch")
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.pip_install("torch")
            else:
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True)
                if torch is None:
                    raise ValueError("PyTorch was not installed; install it from the PyTorch extension's module, "
                                     "or choose an external Python interpreter that has it")
        if packages:
            slicer.util.pip_install(" ".join(packages))

    # ----------------------------------------------------------------------------- inputs

    def loadDemoData(self, pythonInterpreter=None, small: bool = False, folder=None):
        """Simulate the demo phantom scan into a temporary folder with the engine; load its reference.

        Returns (data folder, reference volume node).
        """
        from CTNeRFReconLib.slicer_bridge.worker import WorkerProcess

        folder = pathlib.Path(folder or tempfile.mkdtemp(prefix="CTNeRFRecon-demo-", dir=slicer.app.temporaryPath))
        args = [str(folder)] + (["--small"] if small else [])
        worker = WorkerProcess(args, None, self.workerConfig(pythonInterpreter),
                               module="CTNeRFReconLib.slicer_bridge.demo_data").start()
        code = worker.wait(timeout=600)
        if code != 0:
            worker.stop(timeout=5)
            raise ValueError("making the demo data failed: " + (" | ".join(list(worker.log)[-5:]) or
                                                                 "no output from the engine"))
        reference = slicer.util.loadVolume(str(folder / "reference.nrrd"), properties={"name": "demo reference"})
        self.setCTWindow(reference)
        return folder, reference

    @staticmethod
    def setCTWindow(node, preset: str = "auto") -> None:
        from CTNeRFReconLib.slicer_bridge.volume_nodes import set_window

        set_window(node, preset)

    def describeScan(self, dataPath) -> str:
        """One line on what the engine understood of the data (format, views, detector, angles, distances)."""
        from CTNeRFReconLib.slicer_bridge.projections import describe_scan, load_scan_file

        return describe_scan(load_scan_file(self._checkedDataPath(dataPath)))

    def showProjections(self, dataPath):
        """The projection stack as a volume node (one view per axial slice)."""
        from CTNeRFReconLib.slicer_bridge.projections import create_projection_node, load_scan_file

        scan = load_scan_file(self._checkedDataPath(dataPath))
        return create_projection_node(slicer.mrmlScene, scan, "CTNeRFRecon projections")

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
        from CTNeRFReconLib.slicer_bridge.session import ReconstructionSession, SessionOptions, grid_request_fields
        from CTNeRFReconLib.slicer_bridge.volume_nodes import Units
        from CTNeRFReconLib.slicer_bridge.worker import ReconstructRequest

        data = self._checkedDataPath(parameters.dataPath)
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
        request = ReconstructRequest(
            data=data, out=pathlib.Path(runFolder), method=parameters.method, preset=parameters.preset,
            device=parameters.device, seed=parameters.seed, resume=resume,
            iterations=parameters.iterations or None, snapshot_every=parameters.snapshotEvery or None, **grid)
        options = SessionOptions(name=parameters.outputVolume.GetName() if parameters.outputVolume else "CTNeRFRecon",
                                 units=Units.HU if parameters.showHU else Units.MU, grid_from_reference=fromReference)
        session = ReconstructionSession(slicer.mrmlScene, request, self.workerConfig(parameters.pythonInterpreter),
                                        options, reference_node=parameters.referenceVolume,
                                        output_node=parameters.outputVolume)
        return session.start()

    def compare(self, referenceNode, outputNode, session=None):
        """Score the output against the reference; returns (metric rows, difference node, metrics table node)."""
        from CTNeRFReconLib.slicer_bridge.compare import compare_nodes
        from CTNeRFReconLib.slicer_bridge.tables import read_key_value_table

        if session is not None and session.output_node is outputNode and session.reference_node is referenceNode:
            session.compare()
            return (read_key_value_table(session.metrics_table_node), session.difference_node,
                    session.metrics_table_node)
        _, difference, table = compare_nodes(slicer.mrmlScene, referenceNode, outputNode)
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
    def setOverlayOpacity(opacity: float) -> None:
        from CTNeRFReconLib.slicer_bridge.views import set_overlay_opacity

        set_overlay_opacity(slicer.mrmlScene, opacity)

    @staticmethod
    def showVolumeRendering(volumeNode, show: bool = True):
        """Show (or hide) the volume rendered in the 3D views; its transfer functions follow the slice
        window/level, so the rendering stays right while the volume updates in place."""
        vrLogic = slicer.modules.volumerendering.logic()
        displayNode = vrLogic.GetFirstVolumeRenderingDisplayNode(volumeNode)
        if displayNode is None:
            if not show:
                return None
            displayNode = vrLogic.CreateDefaultVolumeRenderingNodes(volumeNode)
            displayNode.SetFollowVolumeDisplayNode(True)
        displayNode.SetVisibility(show)
        return displayNode

    @staticmethod
    def showTable(tableNode) -> None:
        """Show a table node in a table view (switching to a layout with one, keeping a plot view)."""
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layoutManager.layout))
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
    """Run with the module's Reload and Test button, or `Slicer --testing --python-code ...`."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CTNeRFRecon_demo_fdk_cpu()

    def test_CTNeRFRecon_demo_fdk_cpu(self):
        """The small demo phantom through the whole module path on CPU: data, run, volume, scores."""
        from CTNeRFReconLib.slicer_bridge.session import SessionState
        from CTNeRFReconLib.slicer_bridge.tables import read_key_value_table

        self.delayDisplay("Making the small demo data")
        logic = CTNeRFReconLogic()
        folder, reference = logic.loadDemoData(small=True)
        self.assertTrue((folder / "projections.mha").exists() or any(folder.glob("*.mha")))

        parameters = logic.getParameterNode()
        parameters.dataPath = folder
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
        logic.showComparison(session.output_node, reference, 0.5)
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetBackgroundVolumeID(), session.output_node.GetID())
        self.assertEqual(composite.GetForegroundVolumeID(), reference.GetID())
        self.assertTrue(composite.GetLinkedControl())
        logic.setOverlayOpacity(1.0)
        self.assertEqual(composite.GetForegroundOpacity(), 1.0)
        displayNode = logic.showVolumeRendering(session.output_node, True)
        self.assertTrue(displayNode.GetVisibility())
        self.assertFalse(logic.showVolumeRendering(session.output_node, False).GetVisibility())
        self.delayDisplay("Test passed")
