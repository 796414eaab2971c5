"""One reconstruction run tied to a MRML scene: the worker's events become node updates.

:class:`ReconstructionSession` starts a :class:`~.worker.WorkerProcess` and, each time
:meth:`ReconstructionSession.poll` is called (a GUI timer in Slicer, a loop in tests), applies the
events that arrived:

* ``progress``: a row in the loss table (created on first use, with its plot chart), and the
  iteration / loss / PSNR / rate / time-left figures in :attr:`progress`;
* ``snapshot``: the snapshot file is read *after* its event (the worker renames a complete file
  into place before announcing it, so the read never sees a torn volume) and copied into the one
  output node, in place; when several snapshots arrived since the last poll only the newest is read;
* ``finished``: the final volume.nrrd into the same node, the engine's metrics (and, with a
  reference node, the comparison of :mod:`.compare` with its difference volume) into tables;
* ``failed``: the message and kind are kept; when no volume arrived, every node this run created
  is removed again, so a refused input leaves the scene as it was.

The loss table grows by one row per ``progress`` event, and its plot chart node observes it, so a
plot view showing the chart redraws as the run goes, not only at the end.

With ``SessionOptions.grid_from_reference`` the reference node is written into the run folder
(``reference.nrrd``, attenuation in 1/mm) and given to the worker as ``--reference``, so the
reconstruction is made on the reference's own grid (and the engine scores it too).

Closing the scene stops the run: the session observes the scene's StartCloseEvent, stops the
worker (its run folder keeps the last volume) and lets go of the nodes the close removes.

Every event also becomes a line of :attr:`ReconstructionSession.log` (with the engine's own messages,
its stderr), for the panel's log pane. With ``SessionOptions.keep_snapshots`` every volume that lands
in the output node is also kept as an item of a Sequence node (index: the iteration), so the user can
scrub back through the run in Slicer's sequence browser. :func:`open_run` loads an earlier run
folder (the volume, the loss curve, the scores) as a finished session that can be resumed.
"""
from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..phantom import MU_WATER
from . import tables
from . import volume_nodes as vn
from .compare import compare_node_volumes, difference_into_node, flatten_metrics, reference_volume_from_node
from .worker import ReconstructRequest, WorkerConfig, WorkerProcess

REFERENCE_FILE = "reference.nrrd"
"""Name of the reference written into the run folder when the output grid is the reference's."""

GRID_CHOICES = ("auto", "reference", "custom")
"""Output grid choices of the panel (see :func:`grid_request_fields`)."""


def grid_request_fields(choice: str, spacing_mm: float = 0.0, size_xyz=(0, 0, 0)) -> dict:
    """The :class:`ReconstructRequest` fields for an output-grid choice.

    ``auto``: the grid the data prescribes, else the field of view's (the engine decides);
    ``reference``: the reference CT's own grid (also set ``SessionOptions.grid_from_reference``);
    ``custom``: the automatic grid's box with a voxel size (``spacing_mm`` > 0) and/or voxel counts
    (``size_xyz``, all three > 0); a zero leaves that part as the engine would choose it.
    """
    if choice not in GRID_CHOICES:
        raise ValueError(f"output grid '{choice}' unknown; use one of {', '.join(GRID_CHOICES)}")
    if choice != "custom":
        return {"grid_spacing": None, "grid_size": None}
    size = tuple(int(n) for n in size_xyz)
    if len(size) != 3 or (any(size) and min(size) < 1):
        raise ValueError(f"output grid size {size_xyz}: give three positive voxel counts (X, Y, Z), or all 0 to "
                         "keep the automatic counts")
    spacing = float(spacing_mm or 0.0)
    if spacing < 0:
        raise ValueError(f"output voxel size {spacing_mm} mm: give a positive size, or 0 for automatic")
    if not spacing and not any(size):
        raise ValueError("a custom output grid needs a voxel size or voxel counts; set one, or choose the "
                         "automatic grid")
    return {"grid_spacing": spacing or None, "grid_size": size if any(size) else None}


def parse_view_list(text: str) -> tuple[int, ...]:
    """The views a "Leave out views" field names, for `--drop-views`: numbers counted from 0 (as the
    projection check names them) and ranges such as 10-12, separated by commas or spaces; empty: none.
    Whether they exist in the scan is the engine's check (`ScanData.without_views`), before any work."""
    views: set[int] = set()
    for item in str(text or "").replace(",", " ").split():
        low, dash, high = item.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            first, last = -1, -1
        if first < 0 or last < first:
            raise ValueError(f"Leave out views: '{item}' is not a view number; give views counted from 0 as the "
                             "projection check names them, separated by commas, e.g. 12, 30 or 10-12 (empty: all "
                             "views are used)")
        views.update(range(first, last + 1))
    return tuple(sorted(views))


def bad_view_advice(check_event: dict, dropped=()) -> str | None:
    """The log line for a projection check that singles out a view (projection_check.suspect_view):
    which view, by how much, and how to leave it out from the panel, in the data's numbering with the
    views already left out kept in the list. None when no view stands out."""
    from ..projection_check import suspect_view

    view = suspect_view(check_event, dropped)
    if view is None:
        return None
    ratio = check_event["rmse"][check_event["worst_view"]] / check_event["median_rmse"]
    views = ", ".join(str(v) for v in sorted({*map(int, dropped), view}))
    return (f"view {view} of the data leaves {ratio:.1f} x the median residual: a bad frame, or a geometry error? "
            f"Look at {Path(str(check_event.get('path'))).name}; if the frame is bad, set Advanced > Leave out views "
            f"to {views} and press Start")


def residuals_line(event: dict, dropped=()) -> str:
    """The log line of a snapshot's per-view residuals: where the run stands against the data, and the view
    that stands out most (numbered as the data number views)."""
    from ..projection_check import SUSPECT_RATIO, suspect_view

    worst, median = event.get("worst_view"), event.get("median_rmse")
    line = f"residuals at iteration {event.get('iteration')}: median {median:.3g}" if median else (
        f"residuals at iteration {event.get('iteration')}")
    view = suspect_view(event, dropped)
    if view is not None:
        ratio = event["rmse"][worst] / median
        line += (f"; view {view} of the data at {ratio:.1f} x the median (above {SUSPECT_RATIO:g} x: if it stays there "
                 "to the end, a bad frame or a geometry error)")
    return line


def method_extra_args(method: str, time_limit_s: float = 0, table_beyond_view: bool = False) -> list[str]:
    """The command-line arguments the panel's nerf-only options add to a run: the time budget, and the
    training grid going on past the sides of the field of view the object reaches when a table top or a
    holder leaves it there and the run's own measurement misses it (`widen_reached_sides`); none for FDK,
    which has neither."""
    if method != "nerf":
        return []
    extra = ["--time-limit", str(int(time_limit_s))] if time_limit_s else []
    if table_beyond_view:
        extra += ["--setting", "widen_reached_sides=true"]
    return extra


class SessionState(enum.Enum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    CANCELLING = "cancelling"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (SessionState.FINISHED, SessionState.CANCELLED, SessionState.FAILED)


@dataclass
class SessionOptions:
    """How a run is shown in the scene."""

    name: str = "CTNeRFRecon"
    """Base name of the nodes this run creates."""
    units: vn.Units = vn.Units.MU
    """Values of the output node: attenuation (1/mm) or HU through the water calibration."""
    mu_water: float = MU_WATER
    window: str = "auto"
    """Window preset applied when the output node is first filled (see volume_nodes.WINDOW_PRESETS)."""
    reference_units: str = "auto"
    """Units of the reference node for the comparison: auto, mu or hu."""
    grid_from_reference: bool = False
    """Reconstruct on the reference node's grid (the node is written into the run folder for the worker)."""
    close_timeout_s: float = 15.0
    """When the scene closes, how long the worker may take to write its last volume before it is killed."""
    keep_snapshots: bool = False
    """Also keep every streamed volume as an item of a Sequence node (index: iteration), to scrub through."""
    log_lines: int = 2000
    """Lines kept in the session's log (events and the engine's messages)."""


@dataclass
class Progress:
    """The latest figures of a run, for a progress bar and its label."""

    iteration: int | None = None
    iterations: int | None = None
    loss: float | None = None
    projection_psnr: float | None = None
    rays_per_batch: int | None = None
    lr: float | None = None
    elapsed_s: float | None = None
    gpu_mem_mb: float | None = None
    rate_it_s: float | None = None
    """Iterations per second over the run so far."""
    time_left_s: float | None = None

    @property
    def fraction(self) -> float | None:
        if self.iteration is None or not self.iterations:
            return None
        return max(0.0, min(1.0, self.iteration / self.iterations))

    def summary(self) -> str:
        """One line for the GUI, e.g. 'iteration 120/600  loss 3.1e-04  PSNR 41.2 dB  8.4 it/s  57 s left'."""
        parts = []
        if self.iteration is not None:
            parts.append(f"iteration {self.iteration}" + (f"/{self.iterations}" if self.iterations else ""))
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3g}")
        if self.projection_psnr is not None:
            parts.append(f"PSNR {self.projection_psnr:.1f} dB")
        if self.rate_it_s:
            parts.append(f"{self.rate_it_s:.3g} it/s")
        if self.time_left_s is not None:
            parts.append(f"{_duration(self.time_left_s)} left")
        elif self.elapsed_s is not None:
            parts.append(f"{_duration(self.elapsed_s)} elapsed")
        return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


@dataclass
class _RateTracker:
    """Iterations per second from (elapsed, iteration) pairs, ignoring the warm-up's first report."""

    first: tuple[float, int] | None = None

    def update(self, p: Progress):
        if p.iteration is None or p.elapsed_s is None:
            return
        if self.first is None or p.iteration < self.first[1]:
            self.first = (p.elapsed_s, p.iteration)
            return
        dt, di = p.elapsed_s - self.first[0], p.iteration - self.first[1]
        if dt > 0 and di > 0:
            p.rate_it_s = di / dt
            if p.iterations:
                p.time_left_s = max(0, p.iterations - p.iteration) / p.rate_it_s


class ReconstructionSession:
    """A reconstruction run whose volume streams into one scalar volume node of ``scene``.

    ``output_node``: an existing volume node to fill (e.g. to resume a run); None creates one at
    the first volume. ``reference_node``: a volume to compare with when the run finishes.
    """

    def __init__(self, scene, request: ReconstructRequest, config: WorkerConfig | None = None,
                 options: SessionOptions | None = None, reference_node=None, output_node=None):
        self.scene = scene
        self.request = request
        self.options = options or SessionOptions()
        self.config = config
        self.worker: WorkerProcess | None = None
        """The engine process, made by :meth:`start`."""
        self.reference_node = reference_node
        self.output_node = output_node
        self.loss_table_node = None
        self.chart_node = None
        self.metrics_table_node = None
        self.difference_node = None
        self.state = SessionState.NOT_STARTED
        self.progress = Progress()
        self.message = ""
        self.failure_kind: str | None = None
        self.started_info: dict | None = None
        self.finished_info: dict | None = None
        self.metrics: dict | None = None
        self.volumes_applied = 0
        """How many volumes (snapshots and the final one) were copied into the output node."""
        self.events: list[dict] = []
        self.log: list[str] = []
        """Human-readable lines: one per event worth reading, and the engine's own messages."""
        self.sequence_node = None
        """With ``keep_snapshots``: the Sequence node holding every streamed volume."""
        self.sequence_browser_node = None
        self.projection_check: dict | None = None
        """The run's ``projection_check`` event (picture path, residual per view), when it sent one."""
        self.residuals: dict | None = None
        """The latest per-view residuals: a snapshot's (`residuals` event) while the run trains, then the
        end-of-run check's."""
        self.residuals_table_node = None
        """A table node of `residuals` (view, angle_deg, rmse, held_out), updated in place as they come."""
        self.residuals_chart_node = None
        """Its plot chart: the residual per view against the view angle (the panel's *Residual per view*)."""
        self.bad_view_advice: str | None = None
        """What to leave out when the projection check singles out a view (`bad_view_advice`), else None: the
        panel shows it under the run's status, where the log's line could be missed."""
        self._log_seen = 0
        self._created: list = []
        self._rate = _RateTracker()
        self._close_observer: int | None = None

    # ------------------------------------------------------------------------------ control

    @property
    def has_run_volume(self) -> bool:
        """The output node holds a volume of this run. What the panel waits for before it fits the slice
        views and turns on volume rendering: the node it was given may still be empty (the output selector's
        "Create new Volume" adds a node with neither voxels nor display node) or hold the previous run's
        volume, on another grid."""
        return self.output_node is not None and self.volumes_applied > 0

    @property
    def run_dir(self) -> Path:
        return Path(self.request.out)

    def start(self) -> "ReconstructionSession":
        """Start the worker (and, for the reference's grid, write the reference for it first).

        Raises ValueError, before any process or node exists, when the inputs cannot work.
        """
        if self.state is not SessionState.NOT_STARTED:
            raise RuntimeError("this session was already started; make a new ReconstructionSession for another run")
        request = self.request
        (self.config or WorkerConfig()).check()  # a missing interpreter: refused before writing anything
        if self.options.grid_from_reference:
            request = replace(request, reference=self._write_reference(), reference_units="mu")
        self.worker = WorkerProcess.reconstruct(request, self.config)
        self.worker.start()
        self.request = request
        self.state = SessionState.RUNNING
        self.message = "starting the reconstruction engine"
        self._close_observer = self.scene.AddObserver(self.scene.StartCloseEvent, self._on_scene_close)
        return self

    def _write_reference(self) -> Path:
        from ..volume_io import write_volume

        node = self.reference_node
        if node is None or node.GetImageData() is None:
            raise ValueError("the output grid is the reference's, but no reference volume (with voxels) is "
                             "selected; choose a reference CT or another output grid")
        volume = reference_volume_from_node(node, self.options.reference_units, self.options.mu_water)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return write_volume(volume, self.run_dir / REFERENCE_FILE)

    def cancel(self):
        """Ask the run to stop (non-blocking); the last volume is kept and loaded when it finishes."""
        if self.state is SessionState.RUNNING:
            self.worker.request_cancel()
            self.state = SessionState.CANCELLING
            self.message = "stopping: the engine writes its last volume"

    def stop(self, timeout: float | None = None):
        """Cancel and wait (blocking) until the process is gone, then apply what it sent: the last volume
        lands in the output node. For a closing scene or application use :meth:`close`."""
        if self.state in (SessionState.RUNNING, SessionState.CANCELLING):
            self.cancel()
            self.worker.stop(timeout)
            self.poll()

    def poll(self) -> list[dict]:
        """Apply every event that arrived since the last call; never blocks on the worker."""
        if self.state is SessionState.NOT_STARTED or self.worker is None:
            return []
        events = self.worker.poll()
        self.events += events
        self._collect_engine_log()
        last_snapshot = max((i for i, e in enumerate(events) if e.get("event") == "snapshot"), default=None)
        for i, event in enumerate(events):
            kind = event.get("event")
            if kind == "snapshot" and i != last_snapshot:
                continue  # a newer complete snapshot is already on disk
            handler = getattr(self, f"_on_{kind}", None)
            if handler is not None:
                handler(event)
            self._log_event(event)
        if self.state.done:
            self._detach_scene()
        return events

    def wait(self, timeout: float, interval: float = 0.05) -> SessionState:
        """Poll until the run is done or the timeout passes (tests and the module's self-test)."""
        deadline = time.monotonic() + timeout
        while not self.state.done and time.monotonic() < deadline:
            self.poll()
            if not self.state.done:
                time.sleep(interval)
        return self.state

    # --------------------------------------------------------------------------------- log

    def _add_log(self, line: str):
        self.log.append(f"{time.strftime('%H:%M:%S')}  {line}")
        if len(self.log) > self.options.log_lines:
            del self.log[: len(self.log) - self.options.log_lines]

    def _collect_engine_log(self):
        """The engine's messages (stderr and non-event stdout lines) that arrived since the last poll."""
        self._log_seen, new = self.worker.log.since(self._log_seen)
        for line in new:
            self._add_log(f"engine: {line}")

    def _log_event(self, event: dict):
        kind = event.get("event")
        if kind == "started":
            self._add_log(f"started: {self.message}")
        elif kind == "progress":
            every = max(1, int((self.progress.iterations or 100) / 20))
            if self.progress.iteration is not None and self.progress.iteration % every == 0:
                self._add_log(self.progress.summary())
        elif kind == "snapshot":
            self._add_log(f"snapshot {event.get('sequence')} at iteration {event.get('iteration')}")
        elif kind == "residuals":
            self._add_log(residuals_line(event, self.request.drop_views))
        elif kind == "projection_check":
            self._add_log(f"projection check: view {event.get('view')} in {event.get('path')}")
            if self.bad_view_advice:
                self._add_log(self.bad_view_advice)
        elif kind in ("finished", "failed"):
            self._add_log(f"{kind}: {self.message}")

    @property
    def status_text(self) -> str:
        """The run's status line for the panel: its message, and under it what to leave out when the
        projection check singled out a frame (said where it is seen, not only in the collapsed log)."""
        return self.message + (f"\n{self.bad_view_advice}" if self.bad_view_advice else "")

    @property
    def created_nodes(self) -> list:
        return [n for n in self._created if n.GetScene() is self.scene]

    # ------------------------------------------------------------------------------- events

    def _on_started(self, event: dict):
        self.started_info = event
        self.message = (f"{event.get('method', '')} on {event.get('device', '')}: {event.get('views', '?')} views, "
                        f"grid {event.get('grid', {}).get('shape_xyz', '?')}")

    def _on_progress(self, event: dict):
        p = self.progress
        for key in ("iteration", "iterations", "loss", "projection_psnr", "rays_per_batch", "lr", "elapsed_s",
                    "gpu_mem_mb"):
            if event.get(key) is not None:
                setattr(p, key, event[key])
        self._rate.update(p)
        if event.get("iteration") is not None and event.get("loss") is not None:
            if self.loss_table_node is None:
                self.loss_table_node = self._track(tables.create_loss_table(self.scene, f"{self.options.name} loss"))
                self.chart_node, series = tables.create_loss_chart(self.scene, self.loss_table_node, self.options.name)
                self._track(series)
                self._track(self.chart_node)
            tables.append_loss_row(self.loss_table_node, event)

    def _on_projection_check(self, event: dict):
        """The engine's measured-vs-rendered check at the end of a run (its picture and per-view residuals)."""
        self.projection_check = event
        self.bad_view_advice = bad_view_advice(event, self.request.drop_views)
        self._on_residuals(event)

    def _on_residuals(self, event: dict):
        """Per-view residuals (a snapshot's while the run trains, or the end-of-run check's) into the table."""
        from .field_tools import residual_table_node

        self.residuals = event
        created = self.residuals_table_node is None
        self.residuals_table_node = residual_table_node(self.scene, event, f"{self.options.name} residuals",
                                                        node=self.residuals_table_node)
        if created:
            self._track(self.residuals_table_node)
            self.residuals_chart_node, series = tables.create_residual_chart(
                self.scene, self.residuals_table_node, self.options.name)
            self._track(series)
            self._track(self.residuals_chart_node)

    def _on_snapshot(self, event: dict):
        self._apply_volume(event.get("path"), event.get("iteration"))

    def _on_finished(self, event: dict):
        self.finished_info = event
        cancelled = bool(event.get("cancelled"))
        paths = event.get("paths") or {}
        self._apply_volume(paths.get("volume") or self.run_dir / "volume.nrrd", event.get("iteration"))
        self.metrics = dict(event.get("metrics") or {})
        rows = [("state", "cancelled" if cancelled else "finished"),
                ("elapsed_s", event.get("elapsed_s")), ("iteration", event.get("iteration"))]
        rows += [(f"engine.{k}", v) for k, v in flatten_metrics(self.metrics)]
        self.metrics_table_node = self._track(tables.write_key_value_table(
            self.scene, [(k, v) for k, v in rows if v is not None], self.metrics_table_node,
            f"{self.options.name} metrics"))
        if self.reference_node is not None and self.output_node is not None:
            self.compare()
        self.state = SessionState.CANCELLED if cancelled else SessionState.FINISHED
        self.message = ("stopped; the last volume is kept" if cancelled else "finished") + \
            f" in {_duration(event.get('elapsed_s') or 0)}"

    def _on_failed(self, event: dict):
        if self.state is SessionState.CANCELLING and event.get("synthetic"):
            # the process ended as asked, before it could report (a SIGTERM during start-up, or a kill
            # after the grace periods): a cancel, not a failure
            self._drop_created_nodes_if_empty()
            self.state = SessionState.CANCELLED
            self.message = ("stopped; the last volume is kept" if self.volumes_applied else
                            "stopped before the engine produced a volume")
            return
        self.failure_kind = event.get("kind", "internal")
        self.message = event.get("message") or "the reconstruction failed"
        self._drop_created_nodes_if_empty()
        self.state = SessionState.FAILED

    def _drop_created_nodes_if_empty(self):
        """No volume arrived: remove every node this run made, so the scene is as it was."""
        if self.volumes_applied == 0:
            for node in reversed(self.created_nodes):
                self.scene.RemoveNode(node)
            self._created.clear()
            self.loss_table_node = self.chart_node = self.metrics_table_node = self.difference_node = None
            if self.output_node is not None and self.output_node.GetScene() is not self.scene:
                self.output_node = None

    def close(self, timeout: float | None = None, reason: str = "the scene was closed"):
        """Stop the worker without applying what it still sends, and let go of every node: for a
        scene that is closing (called on its StartCloseEvent) or an application that is quitting.

        The events that arrived are kept in :attr:`events`; the run folder holds the last volume.
        ``timeout`` bounds the wait for a clean stop (default ``SessionOptions.close_timeout_s``).
        """
        if not self.state.done and self.worker is not None:
            self.worker.stop(timeout=self.options.close_timeout_s if timeout is None else timeout)
            late = self.worker.poll()
            self.events += late
            last = next((e for e in reversed(late) if e.get("event") in ("finished", "failed")), {})
            if last.get("event") == "finished" and not last.get("cancelled"):
                self.state, self.message = SessionState.FINISHED, f"finished; the volume is in {self.run_dir}"
            elif last.get("event") == "failed" and not last.get("synthetic"):
                self.state, self.failure_kind = SessionState.FAILED, last.get("kind", "internal")
                self.message = last.get("message") or "the reconstruction failed"
            else:
                self.state = SessionState.CANCELLED
                self.message = f"stopped: {reason}; the last volume is in {self.run_dir}"
        self.output_node = self.reference_node = None
        self.loss_table_node = self.chart_node = self.metrics_table_node = self.difference_node = None
        self._created.clear()
        self._detach_scene()

    def _on_scene_close(self, caller=None, event=None):
        self.close()

    def abort(self, message: str, timeout: float = 10.0):
        """End the run after an error on this side (an event that could not be applied): the worker is
        stopped, or killed when stopping fails, and the state is FAILED whatever goes wrong on the way,
        so a client's timer never keeps polling a run stuck in CANCELLING."""
        try:
            if self.worker is not None:
                self.worker.stop(timeout=timeout)
        except Exception:  # noqa: BLE001 - the run must end even when stopping it fails
            try:
                self.worker.kill_tree()
            except Exception:  # noqa: BLE001
                pass
        finally:
            self.state = SessionState.FAILED
            self.failure_kind = "internal"
            self.message = message
            self._add_log(f"stopped after an error: {message}")
            self._detach_scene()

    def _detach_scene(self):
        if self._close_observer is not None:
            self.scene.RemoveObserver(self._close_observer)
            self._close_observer = None

    # ------------------------------------------------------------------------------ helpers

    def _track(self, node):
        if node is not None and node not in self._created:
            self._created.append(node)
        return node

    def _apply_volume(self, path, iteration):
        if not path:
            return
        volume = vn.load_volume_file(path)
        if self.output_node is None:
            self.output_node = self._track(vn.create_volume_node(
                self.scene, volume, self.options.name, self.options.units, self.options.mu_water,
                self.options.window))
            self.output_node.SetAttribute(vn.ATTR_ITERATION, str(int(iteration or 0)))
        else:
            fresh = self.output_node.GetImageData() is None
            vn.update_volume_node(self.output_node, volume, self.options.units, self.options.mu_water, iteration)
            if fresh or self.output_node.GetDisplayNode() is None:
                vn.set_window(self.output_node, self.options.window)
        self.output_node.SetAttribute("CTNeRFRecon.RunFolder", str(self.run_dir))
        self.volumes_applied += 1
        if self.options.keep_snapshots:
            self._keep_in_sequence(iteration)

    def _keep_in_sequence(self, iteration):
        """Copy the output node, as it is now, into the Sequence node at index ``iteration``."""
        if self.sequence_node is None or self.sequence_node.GetScene() is not self.scene:
            self.sequence_node = self._track(self.scene.AddNewNodeByClass(
                "vtkMRMLSequenceNode", self.scene.GenerateUniqueName(f"{self.options.name} snapshots")))
            self.sequence_node.SetIndexName("iteration")
            self.sequence_node.SetIndexUnit("")
            self.sequence_node.SetIndexType(self.sequence_node.NumericIndex)
            if self.scene.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode"):
                self.sequence_browser_node = self._track(self.scene.AddNewNodeByClass(
                    "vtkMRMLSequenceBrowserNode", self.scene.GenerateUniqueName(f"{self.options.name} snapshots browser")))
                self.sequence_browser_node.SetAndObserveMasterSequenceNodeID(self.sequence_node.GetID())
        index = str(int(iteration or 0))
        self.sequence_node.SetDataNodeAtValue(self.output_node, index)

    def compare(self):
        """Compare the output node with the reference node (difference volume + metrics rows)."""
        if self.reference_node is None or self.output_node is None:
            raise ValueError("comparing needs a reference volume and a reconstruction; choose both first")
        comparison = compare_node_volumes(self.reference_node, self.output_node, self.options.reference_units,
                                          self.options.mu_water)
        self.difference_node = difference_into_node(self.scene, comparison, f"{self.options.name} difference",
                                                    self.difference_node)
        self._track(self.difference_node)
        rows = dict(tables.read_key_value_table(self.metrics_table_node)) if self.metrics_table_node else {}
        rows.update([("reference", self.reference_node.GetName())] + flatten_metrics(comparison.metrics))
        self.metrics_table_node = self._track(tables.write_key_value_table(
            self.scene, list(rows.items()), self.metrics_table_node, f"{self.options.name} metrics"))
        self.metrics = {**(self.metrics or {}), "comparison": comparison.metrics}
        return comparison

    # ------------------------------------------------------------------------------ resume

    @property
    def resumable(self) -> bool:
        """The run folder holds a checkpoint to continue from (iterative methods only)."""
        return self.state.done and (self.run_dir / "checkpoint.pt").is_file()

    def resume_request(self) -> ReconstructRequest:
        """The request that continues this run in its own folder, with the settings it was started with."""
        if not (self.run_dir / "checkpoint.pt").is_file():
            raise ValueError(f"{self.run_dir}: this run has no checkpoint.pt to continue from (FDK runs and runs "
                             "stopped before their first checkpoint cannot be resumed); press Start for a new run")
        return replace(self.request, resume=True, overwrite=False)


def _run_json_error(path: Path, field: str, problem: str) -> ValueError:
    return ValueError(f"{path}: field '{field}': {problem}. Fix: choose a run folder written by CTNeRFRecon "
                      "(it holds run.json, events.jsonl and volume.nrrd or snapshot.nrrd)")


def request_from_run_info(run_dir: Path, run_info: dict) -> ReconstructRequest:
    """The ReconstructRequest a run folder's run.json records (its `options`), pointed at that folder."""
    path = Path(run_dir) / "run.json"
    options = run_info.get("options")
    if not isinstance(options, dict) or not isinstance(options.get("data"), str):
        raise _run_json_error(path, "options.data", "missing (the run's data path is not recorded)")

    def optional_path(key):
        value = options.get(key)
        return Path(value) if isinstance(value, str) and value else None

    size = options.get("grid_size")
    method = run_info.get("method") if isinstance(run_info.get("method"), str) else options.get("method")
    try:
        return ReconstructRequest(
            data=Path(options["data"]), out=Path(run_dir), projections=optional_path("projections"),
            reference=optional_path("reference"), reference_units=options.get("reference_units"),
            method=method, preset=str(options.get("preset") or "standard"), device=str(options.get("device") or "auto"),
            seed=int(options.get("seed") or 0), grid_spacing=options.get("grid_spacing"),
            grid_size=tuple(int(n) for n in size) if size else None, iterations=options.get("iterations"),
            snapshot_every=options.get("snapshot_every"),
            drop_views=tuple(int(v) for v in options.get("drop_views") or ()), extra_args=_recorded_extra_args(options))
    except (TypeError, ValueError) as exc:
        raise _run_json_error(path, "options", f"not readable ({exc})") from None


def _recorded_extra_args(options: dict) -> list[str]:
    """The command-line arguments of the run.json options that ReconstructRequest has no field for (the
    time budget, nerf's switches and settings, FDK's filter...): a resumed run must be given them again,
    since the checkpoint is refused for other settings, another training grid or other data.
    Testing/test_resume_options.py sends every option through run.json and back."""
    from ..projection_check import RESIDUALS_EVERY_S

    args: list[str] = []
    for key, flag in (("time_limit", "--time-limit"), ("tv_weight", "--tv-weight"), ("fdk_cutoff", "--fdk-cutoff"),
                      ("progress_every", "--progress-every")):
        if options.get(key) is not None:
            args += [flag, repr(options[key])]
    if options.get("fdk_filter"):
        args += ["--fdk-filter", str(options["fdk_filter"])]
    if options.get("mu_water") is not None and float(options["mu_water"]) != MU_WATER:
        args += ["--mu-water", repr(float(options["mu_water"]))]
    if options.get("residuals_every") is not None and float(options["residuals_every"]) != RESIDUALS_EVERY_S:
        args += ["--residuals-every", repr(float(options["residuals_every"]))]
    for key, flag in (("support", "--no-support"), ("coarse_to_fine", "--no-coarse-to-fine"),
                      ("use_prior", "--no-prior"), ("kernels", "--no-kernels")):
        if options.get(key) is False:
            args.append(flag)
    for setting in options.get("setting_overrides") or ():
        args += ["--setting", str(setting)]
    return args


def open_run(scene, run_dir, config: WorkerConfig | None = None, options: SessionOptions | None = None,
             reference_node=None) -> ReconstructionSession:
    """Load an earlier run folder into ``scene`` as a finished (or stopped) session.

    The volume (volume.nrrd, else the last complete snapshot.nrrd) goes into a new output node, the
    progress events into the loss table and chart, the engine's scores into the metrics table. The
    session's :meth:`~ReconstructionSession.resume_request` continues the run after a restart of
    Slicer. Raises ValueError naming the file and the fix for a folder that is not a run folder.
    """
    from ..events import read_events

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: not a folder; choose the folder of an earlier run (it holds run.json)")
    info_path = run_dir / "run.json"
    try:
        run_info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{info_path}: not found, so {run_dir} is not a CTNeRFRecon run folder; choose the "
                         "folder of an earlier run (it holds run.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _run_json_error(info_path, "(file)", f"unreadable ({exc})") from None
    if not isinstance(run_info, dict):
        raise _run_json_error(info_path, "(file)", "not a JSON object")
    request = request_from_run_info(run_dir, run_info)
    volume_path = next((p for p in (run_dir / "volume.nrrd", run_dir / "snapshot.nrrd") if p.is_file()), None)
    if volume_path is None:
        raise ValueError(f"{run_dir}: this run holds no volume yet (neither volume.nrrd nor snapshot.nrrd); "
                         "resume it from the command line, or choose another run folder")
    options = options or SessionOptions()
    session = ReconstructionSession(scene, request, config, options, reference_node=reference_node)
    events = read_events(run_dir / "events.jsonl")
    session.events = list(events)
    for event in events:
        if event.get("event") == "progress":
            session._on_progress(event)
        elif event.get("event") == "projection_check":  # its picture, and a frame it singled out
            session._on_projection_check(event)
    last = next((e for e in reversed(events) if e.get("event") in ("started", "finished", "failed")), {})
    if last.get("event") == "finished" and volume_path.name == "volume.nrrd":
        # the folder may have moved since: its own volume.nrrd, not the path the event recorded
        session._on_finished({**last, "paths": {**(last.get("paths") or {}), "volume": str(volume_path)}})
    else:
        session._apply_volume(volume_path, session.progress.iteration)
        session.state = SessionState.FAILED if last.get("event") == "failed" else SessionState.CANCELLED
        session.failure_kind = last.get("kind") if last.get("event") == "failed" else None
        session.message = (f"opened an unfinished run (its last complete volume, {volume_path.name})"
                           if session.state is SessionState.CANCELLED else
                           f"opened a failed run: {last.get('message') or 'no message'}")
    session._add_log(f"opened {run_dir}: {session.message}")
    return session
