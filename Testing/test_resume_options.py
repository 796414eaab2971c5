"""Open run folder > Resume continues a run with every option it was started with.

The panel rebuilds the worker's command line from run.json (`request_from_run_info`): the fields
ReconstructRequest has, and `_recorded_extra_args` for the rest. A command-line option added later and
forgotten there was dropped silently on resume (the checkpoint then refused the run, or the run went on
with another setting), so this sends every ReconstructOptions field, each away from its default, through
the whole trip: run.json, the request, its arguments, the command-line parser, the options again.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from CTNeRFReconLib.cli import build_parser, reconstruct_options
from CTNeRFReconLib.events import to_json_value
from CTNeRFReconLib.slicer_bridge.session import request_from_run_info
from CTNeRFReconLib.worker import ReconstructOptions

NOT_CARRIED = {
    "out": "the resumed run's folder is the opened folder itself",
    "resume": "a resume request resumes",
    "overwrite": "a resume never overwrites",
    "quiet": "the panel's worker reports through events; the terminal's progress bar is not part of the run",
}
"""Fields a resumed run does not take from run.json, and why."""


def started_with(tmp_path: Path) -> ReconstructOptions:
    """Options with every field away from its default (a new field without a value here fails the test)."""
    values = dict(
        data=tmp_path / "scan" / "geometry.xml", out=tmp_path / "run", projections=tmp_path / "scan" / "stack.mha",
        drop_views=(2, 9), reference=tmp_path / "ct.nrrd", reference_units="hu", mu_water=0.0201, method="nerf",
        preset="high", device="cpu", seed=3, resume=True, overwrite=True, grid_spacing=2.5, grid_size=(40, 50, 60),
        iterations=700, snapshot_every=50, progress_every=7, residuals_every=3.5, kernels=False, tv_weight=0.25,
        quiet=True, fdk_filter="hamming", fdk_cutoff=0.8, time_limit=90.0, support=False, coarse_to_fine=False,
        use_prior=False, setting_overrides=("generator_width=16", "refine_fraction=0.5"))
    fields = {f.name: f for f in dataclasses.fields(ReconstructOptions)}
    assert set(values) == set(fields), f"give the new fields a value here: {sorted(set(fields) - set(values))}"
    defaults = ReconstructOptions(data=Path("d"), out=Path("o"))
    for name, value in values.items():
        assert value != getattr(defaults, name) or name in ("data", "out"), f"{name} is at its default"
    return ReconstructOptions(**values)


def test_every_option_survives_open_run_folder_and_resume(tmp_path):
    opts = started_with(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_info = json.loads(json.dumps(to_json_value({"command": "reconstruct", "options": dataclasses.asdict(opts),
                                                    "method": opts.method})))
    request = request_from_run_info(run_dir, run_info)
    resumed = dataclasses.replace(request, resume=True, overwrite=False)
    parsed = reconstruct_options(build_parser().parse_args(resumed.to_args()))

    before, after = to_json_value(dataclasses.asdict(opts)), to_json_value(dataclasses.asdict(parsed))
    lost = {name: (before[name], after[name]) for name in before if name not in NOT_CARRIED
            and before[name] != after[name]}
    assert lost == {}, f"options a resume drops or changes (started with, resumed with): {lost}"
    assert Path(after["out"]) == run_dir and after["resume"] is True and after["overwrite"] is False


def test_defaults_add_nothing_to_the_resumed_command_line(tmp_path):
    """A run started with the defaults resumes with the plain command line (nothing spelled out twice)."""
    opts = ReconstructOptions(data=tmp_path / "scan", out=tmp_path / "run")
    run_info = {"options": to_json_value(dataclasses.asdict(opts)), "method": "nerf"}
    request = request_from_run_info(tmp_path / "run", run_info)
    assert request.extra_args == []
    parsed = reconstruct_options(build_parser().parse_args(request.to_args()))
    assert to_json_value(dataclasses.asdict(parsed)) == to_json_value(
        dataclasses.asdict(dataclasses.replace(opts, method="nerf")))
