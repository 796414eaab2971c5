"""A nerf run that cannot fit in memory is refused before any work, with the figures and the fix."""
from __future__ import annotations

import io
import json
from collections import namedtuple

import pytest

from CTNeRFReconLib.events import ExitCode
from CTNeRFReconLib.formats import load_scan
from CTNeRFReconLib.geometry import VolumeGrid
from CTNeRFReconLib.nerf.memory import check_fits, estimate
from CTNeRFReconLib.worker import ReconstructOptions, run_reconstruction
from worker_case import write_small_case


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_small_case(tmp_path_factory.mktemp("mem") / "case")


def test_the_estimate_grows_with_rays_grid_and_batch(case):
    scan = load_scan(case)
    grid = VolumeGrid.centered((48, 48, 48), (4.0, 4.0, 4.0))
    small = estimate(scan, grid, {"preset": "preview"}, "cpu")
    big = estimate(scan, grid, {"preset": "high"}, "cpu")
    assert small["device"] == {} and sum(small["host"].values()) > 1e6
    assert sum(big["host"].values()) > sum(small["host"].values())  # larger batches and planes
    gpu = estimate(scan, grid, {"preset": "preview"}, "cuda")
    assert set(gpu["device"]) == {"rays", "training_grid", "factors", "ray_batch"}
    with pytest.raises(MemoryError, match=r"GiB of GPU memory.*Fix: give a coarser --grid-spacing"):
        check_fits(gpu, available_host=1 << 40, available_device=1 << 20)
    check_fits(small, available_host=1 << 40)


def test_a_run_that_cannot_fit_is_refused_before_any_work(case, tmp_path, monkeypatch):
    import psutil

    Mem = namedtuple("Mem", "available total")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem(10 << 20, 10 << 20))  # 10 MiB free
    out = io.StringIO()
    run = tmp_path / "run"
    opts = ReconstructOptions(data=case, out=run, method="nerf", preset="preview", device="cpu", quiet=True)
    assert run_reconstruction(opts, stream=out) == ExitCode.OUT_OF_MEMORY
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["failed"] and events[0]["kind"] == "out_of_memory"
    msg = events[0]["message"]
    assert "GiB of RAM but 0.0 GiB are available" in msg and "refused before any work" in msg
    assert "Fix:" in msg and "--preset preview" in msg
    assert sorted(p.name for p in run.iterdir()) == ["events.jsonl"]
