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
    iterations: Annotated[int, WithinRange(0, 1000000)] = 0
    """0: the preset's."""
    snapshotEvery: Annotated[int, WithinRange(0, 1000000)] = 0
    """0: the method's default."""
    gridSpacing: Annotated[float, WithinRange(0.0, 100.0)] = 0.0
    """Output voxel size in mm; 0: automatic."""
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    showHU: bool = False
    runFolder: pathlib.Path
    """Empty: a new folder under Slicer's temporary folder for each run."""
    pythonInterpreter: pathlib.Path
    """Empty: Slicer's own Python (PythonSlicer)."""


def _is_set(path) -> bool:
    return path is not None and str(path) not in ("", ".")


#
# CTNeRFReconWidget
#


class CTNeRFReconWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Slicer calls setup() once when the module is first shown, enter()/exit() each
    time it is shown/hidden, and cleanup() when the application closes or the module is reloaded."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._session = None
        self._lastRunFolder = None
        self._shownOutput = False
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
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.showDifferenceButton.connect("clicked(bool)", self.onShowDifference)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTimer)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Application exit or module reload: stop the worker, drop observers."""
        self._stopSession()
        self.removeObservers()

    def enter(self) -> None:
        """The module is shown: make sure the parameter node exists and is bound."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """The module is hidden: unbind the GUI (the run goes on; the timer keeps polling)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        """The scene is about to close: stop the run before its nodes go away."""
        self._stopSession()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the GUI to a parameter node (two-way, through connectGui)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._session is not None and not self._session.state.done
        hasData = p is not None and _is_set(p.dataPath)
        self.ui.startButton.enabled = hasData and not running
        self.ui.cancelButton.enabled = running
        self.ui.resumeButton.enabled = (not running and self._lastRunFolder is not None
                                        and p is not None and p.method == "nerf")
        self.ui.showProjectionsButton.enabled = hasData
        self.ui.loadDemoButton.enabled = not running
        hasOutput = p is not None and p.outputVolume is not None and p.outputVolume.GetImageData() is not None
        self.ui.compareButton.enabled = hasOutput and p.referenceVolume is not None and not running
        self.ui.showDifferenceButton.enabled = self._session is not None and self._session.difference_node is not None

    # -------------------------------------------------------------------------------- actions

    def onLoadDemo(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to make the demo data.", waitCursor=True):
            if not self._ensureEngine():
                return
            folder, reference = self.logic.loadDemoData(self._parameterNode.pythonInterpreter)
            self._parameterNode.dataPath = folder
            self._parameterNode.referenceVolume = reference
            self.ui.scanInfoLabel.text = self.logic.describeScan(folder)

    def onShowProjections(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to show the projections.", waitCursor=True):
            node = self.logic.showProjections(self._parameterNode.dataPath)
            slicer.util.setSliceViewerLayers(background=node, foreground=None, fit=True)
            self.ui.scanInfoLabel.text = self.logic.describeScan(self._parameterNode.dataPath)

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
            self._shownOutput = False
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

    def onCompare(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to compare with the reference.", waitCursor=True):
            p = self._parameterNode
            rows, difference = self.logic.compare(p.referenceVolume, p.outputVolume, self._session)
            self.ui.metricsLabel.text = self.logic.metricsSummary(rows)
            slicer.util.setSliceViewerLayers(background=p.outputVolume, foreground=difference, foregroundOpacity=0.5)
        self._updateButtons()

    def onShowDifference(self) -> None:
        if self._session is not None and self._session.difference_node is not None:
            slicer.util.setSliceViewerLayers(background=self._session.output_node,
                                             foreground=self._session.difference_node, foregroundOpacity=0.5)

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
        if session.output_node is not None and not self._shownOutput:
            self._shownOutput = True
            self._parameterNode.outputVolume = session.output_node
            slicer.util.setSliceViewerLayers(background=session.output_node, fit=True)
            self._linkSliceViews()
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

        self.ui.progressBar.maximum = 1000
        self.ui.progressBar.value = 1000 if session.state is SessionState.FINISHED else self.ui.progressBar.value
        self.ui.statusLabel.text = session.message
        if session.chart_node is not None:
            slicer.modules.plots.logic().ShowChartInLayout(session.chart_node)
        if session.metrics_table_node is not None:
            from CTNeRFReconLib.slicer_bridge.tables import read_key_value_table

            self.ui.metricsLabel.text = self.logic.metricsSummary(read_key_value_table(session.metrics_table_node))
        if session.difference_node is not None:
            self.onShowDifference()
        if session.state is SessionState.FAILED:
            hint = self.logic.failureHint(session.failure_kind)
            slicer.util.errorDisplay(f"The reconstruction failed: {session.message}" + (f"\n\n{hint}" if hint else ""))

    def _linkSliceViews(self) -> None:
        for name in slicer.app.layoutManager().sliceViewNames():
            composite = slicer.app.layoutManager().sliceWidget(name).mrmlSliceCompositeNode()
            composite.SetLinkedControl(True)

    def _stopSession(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._session is not None and not self._session.state.done:
            self._session.stop(timeout=15)
        self._session = None

    def _ensureEngine(self) -> bool:
        """At first use (never at import): offer to install what the engine needs in Slicer's Python."""
        if _is_set(self._parameterNode.pythonInterpreter):
            return True  # an external environment: its own business (a failed run says what is missing)
        missing = self.logic.missingEnginePackages()
        if not missing:
            return True
        names = ", ".join(missing)
        if not slicer.util.confirmOkCancelDisplay(
                f"The reconstruction engine needs these Python packages in Slicer: {names}.\n\n"
                "Install them now? (PyTorch comes from the PyTorch extension when it is installed, which picks "
                "the build that fits your GPU; this can take several minutes.)", "CTNeRFRecon setup"):
            return False
        with slicer.util.tryWithErrorDisplay("Failed to install the engine's packages.", waitCursor=True):
            self.logic.installEnginePackages(missing)
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

    @staticmethod
    def missingEnginePackages() -> list:
        """pip names of the engine's packages that Slicer's own Python lacks (torch first)."""
        missing = [] if importlib.util.find_spec("torch") else ["torch"]
        return missing + [pip for name, pip in ENGINE_PACKAGES.items() if importlib.util.find_spec(name) is None]

    @staticmethod
    def installEnginePackages(packages) -> None:
        """torch through the PyTorch extension when present (GPU-matched build), the rest with pip."""
        packages = list(packages)
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
        """One line on what the engine understood of the data (format, views, detector)."""
        from CTNeRFReconLib.slicer_bridge.projections import load_scan_file

        scan = load_scan_file(self._checkedDataPath(dataPath))
        rows, cols = scan.geometry.det_shape
        return (f"{scan.source_format}: {scan.n_views} views of {rows} x {cols} pixels "
                f"({scan.geometry.pixel_pitch[1]:.3g} mm)")

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
        from CTNeRFReconLib.slicer_bridge.session import ReconstructionSession, SessionOptions
        from CTNeRFReconLib.slicer_bridge.volume_nodes import Units
        from CTNeRFReconLib.slicer_bridge.worker import ReconstructRequest

        data = self._checkedDataPath(parameters.dataPath)
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
            iterations=parameters.iterations or None, snapshot_every=parameters.snapshotEvery or None,
            grid_spacing=parameters.gridSpacing or None)
        options = SessionOptions(name=parameters.outputVolume.GetName() if parameters.outputVolume else "CTNeRFRecon",
                                 units=Units.HU if parameters.showHU else Units.MU)
        session = ReconstructionSession(slicer.mrmlScene, request, self.workerConfig(parameters.pythonInterpreter),
                                        options, reference_node=parameters.referenceVolume,
                                        output_node=parameters.outputVolume)
        return session.start()

    def compare(self, referenceNode, outputNode, session=None):
        """Score the output against the reference; returns (metric rows, difference node)."""
        from CTNeRFReconLib.slicer_bridge.compare import compare_nodes
        from CTNeRFReconLib.slicer_bridge.tables import read_key_value_table

        if session is not None and session.output_node is outputNode and session.reference_node is referenceNode:
            session.compare()
            return read_key_value_table(session.metrics_table_node), session.difference_node
        if session is not None:
            session.reference_node = referenceNode
        _, difference, table = compare_nodes(slicer.mrmlScene, referenceNode, outputNode)
        return read_key_value_table(table), difference

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

        self.delayDisplay("Reconstructing with FDK on CPU")
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
        self.delayDisplay("Test passed")
