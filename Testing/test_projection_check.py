"""Projection check: rendered against measured projections, per-view residuals over the angle.

Measured data are made with the renderer itself from a voxel phantom (so the forward model is exact)
plus Gaussian noise of a known level; one view's measurement is taken 3 degrees away from where the
geometry says. That view's residual must stand out (> 3x the median); the others must sit at the
noise level. A real run's end-of-run check (the worker's `projection_check` event and picture) and
the `check` command are run on an FDK run of the field case.
"""
from __future__ import annotations

import json

import numpy as np

import field_case as fc
from CTNeRFReconLib.cli import main
from CTNeRFReconLib.data import ScanData, Volume
from CTNeRFReconLib.phantom import voxelize
from CTNeRFReconLib.projection_check import (LiveResiduals, projection_check, render_projections, suspect_view,
                                             view_angles_deg)

SIGMA = 0.002
"""Noise of the line integrals (about I0 = 2.5e5 photons per pixel behind air; the phantom's line
integrals reach 1.4). A 3 degree error of this smooth phantom leaves a residual of about 0.007 on
its own, so the bad view shows at about 3.7x the median here; at SIGMA = 0.004 it is 2x."""


def test_a_view_off_by_three_degrees_stands_out(tmp_path):
    volume = Volume(voxelize(fc.PHANTOM, fc.GRID, supersample=2), fc.GRID)
    nominal = fc.geometry(24, 64)
    actual = fc.geometry(24, 64, {5: 3.0})  # view 5 was really taken at 75 + 3 degrees
    clean = render_projections(volume, actual, np.arange(24))
    measured = clean + np.random.default_rng(1).normal(0.0, SIGMA, clean.shape)
    scan = ScanData(measured.astype(np.float32), nominal, "synthetic", "<one bad view>")
    res = projection_check(volume, scan, tmp_path / "pc.png")
    rmse = np.asarray(res["rmse"])
    others = np.delete(rmse, 5)
    print(f"view 5: {rmse[5]:.4f}, others {others.min():.4f} to {others.max():.4f}, median {res['median_rmse']:.4f}")
    assert res["worst_view"] == 5 and res["view"] == 5 and rmse[5] > 3 * res["median_rmse"]
    assert np.all(np.abs(others / SIGMA - 1) < 0.1)  # the noise level, nothing more
    assert abs(res["angle_deg"] - 75.0) < 1e-9 and np.allclose(view_angles_deg(nominal)[:3], [0, 15, 30])
    assert (tmp_path / "pc.png").stat().st_size > 10_000
    # named for --drop-views in the data's numbering: had views 2 and 9 been left out already, it is view 6
    assert suspect_view(res) == 5 and suspect_view(res, dropped=(9, 2)) == 6 and suspect_view(res, (5,)) == 6
    assert suspect_view({**res, "held_out": [5]}) is None, "a held-out view is not the data's to drop"
    clean_check = projection_check(volume, ScanData(render_projections(volume, nominal, np.arange(24)), nominal,
                                                    "synthetic", "<exact>"))
    assert suspect_view(clean_check) is None


def test_end_of_run_event_and_check_command(tmp_path, capsys):
    run = fc.cached_run("fdk")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[-2:] == ["projection_check", "finished"]
    pc = events[-2]
    assert set(pc) >= {"view", "angle_deg", "rmse", "path"} and len(pc["rmse"]) == 24
    assert pc["path"] == str(run / "projection_check.png") and (run / "projection_check.png").is_file()
    assert events[-1]["paths"]["projection_check"] == pc["path"]
    assert json.loads((run / "run.json").read_text())["projection_check"]["view"] == pc["view"]
    out = tmp_path / "view3.png"
    assert main(["check", str(run), "--view", "3", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["view"] == 3 and out.is_file() and np.allclose(res["rmse"], pc["rmse"], rtol=1e-5)
    assert main(["check", str(run), "--view", "99"]) == 2
    assert "field '--view'" in capsys.readouterr().err


def test_residuals_during_a_run_take_at_most_their_share_of_its_time():
    """`LiveResiduals`: the first after `min_interval_s`; after a check that cost c seconds, the next only once
    c / max_share seconds have passed (here 0.5 s at 2 %: 25 s, more than the 10 s interval)."""
    volume = Volume(voxelize(fc.PHANTOM, fc.GRID, supersample=2), fc.GRID)
    geometry = fc.geometry(8, 32)
    scan = ScanData(render_projections(volume, geometry, np.arange(8)), geometry, "synthetic", "<exact>")
    now = [100.0]

    def clock():
        now[0] += 0.25  # each reading of the clock: a check reads it twice, so it costs 0.25 s
        return now[0]

    live = LiveResiduals(scan, min_interval_s=10.0, max_share=0.01, clock=clock)
    now[0] += 9.0
    assert not live.due()
    now[0] += 1.0
    assert live.due()
    res = live(volume)
    assert len(res["rmse"]) == 8 and res["median_rmse"] < 1e-3 and live.cost == 0.25
    now[0] += 20.0
    assert not live.due(), "0.25 s at 1 % asks for 25 s"
    now[0] += 5.0
    assert live.due()
