"""The command line as a user runs it: info, demo (the main user path), simulate, usage errors."""
from __future__ import annotations

import json
import re

import pytest

from CTNeRFReconLib.events import ExitCode
from CTNeRFReconLib.volume_io import read_volume

from worker_case import SHARED_DATA, run_cli, write_small_case


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_small_case(tmp_path_factory.mktemp("case") / "data")


def test_info_prints_what_was_detected(case):
    res = run_cli("info", case)
    assert res.returncode == 0, res.stderr
    assert "RTK" in res.stdout and "24 views" in res.stdout and "48 rows x 48 columns" in res.stdout
    as_json = json.loads(run_cli("info", case, "--json").stdout)
    assert as_json["format"] == "rtk" and as_json["views"] == 24 and as_json["frame"] == "rtk"
    # 6.4 mm pixels at magnification 1.5 -> 4.267 mm voxels over the cylinder every view sees
    assert as_json["voxel_at_isocentre_mm"] == pytest.approx(6.4 / 1.5)
    assert as_json["default_grid"]["shape_xyz"] == [48, 48, 48]


def test_info_refuses_a_missing_path_with_a_message(tmp_path):
    res = run_cli("info", tmp_path / "nothing_here")
    assert res.returncode == ExitCode.BAD_INPUT
    assert "nothing_here" in res.stderr and "Traceback" not in res.stderr


def test_usage_error_exits_2_with_usage():
    res = run_cli("reconstruct")
    assert res.returncode == ExitCode.BAD_INPUT
    assert "usage:" in res.stderr and "Traceback" not in res.stderr


def test_demo_runs_end_to_end(tmp_path):
    """The main user path with its defaults (nerf when available), on the small case."""
    out = tmp_path / "demo"
    res = run_cli("demo", "--out", out, "--small", "--iterations", "30", timeout=240)
    assert res.returncode == 0, res.stderr
    match = re.search(r"PSNR ([\d.]+) dB\s+SSIM ([\d.]+)", res.stdout)
    assert match, res.stdout
    psnr = float(match.group(1))
    assert psnr > 15, res.stdout
    if "nerf" in res.stdout:  # the method's value: FDK's scores on the same scan beside it
        assert re.search(r"vs FDK on the same scan: PSNR [\d.]+ dB\s+SSIM [\d.]+", res.stdout), res.stdout
    assert "Warning" not in res.stderr, res.stderr  # nothing leaks to the terminal (numpy, torch...)
    volume_path = out / "run" / "volume.nrrd"
    assert str(volume_path) in res.stdout and str(out / "run" / "preview.png") in res.stdout
    assert read_volume(volume_path).grid.shape_xyz == read_volume(out / "data" / "reference.nrrd").grid.shape_xyz
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["psnr"] == pytest.approx(psnr, abs=0.01)
    run = json.loads((out / "run" / "run.json").read_text())
    assert run["method"] == ("nerf" if "nerf" in run_cli("reconstruct", "--help").stdout else "fdk")
    # a second demo in the same folder replaces the first one's results
    assert run_cli("demo", "--out", out, "--small", "--method", "fdk", "--quiet", timeout=120).returncode == 0


@pytest.mark.skipif(not (SHARED_DATA / "abdomen_small_ct.nii.gz").exists(),
                    reason="../shared/data/abdomen_small_ct.nii.gz (TotalSegmentator example, CC BY 4.0) is absent")
def test_simulate_then_info(tmp_path):
    out = tmp_path / "abdomen"
    res = run_cli("simulate", SHARED_DATA / "abdomen_small_ct.nii.gz", "--views", "8", "--det", "64",
                  "--pitch", "8", "--voxel", "6", "--out", out)
    assert res.returncode == 0, res.stderr
    # progress without a terminal: a line per tenth of the views, so a long simulation never looks hung
    assert "projected 8 of 8 views" in res.stderr and res.stderr.count("projected") >= 4
    info = json.loads(run_cli("info", out, "--json").stdout)
    assert info["format"] == "rtk" and info["views"] == 8 and info["detector_rows_cols"] == [64, 64]
    assert info["angles_deg"] == pytest.approx([0.0, 315.0])
    again = run_cli("simulate", SHARED_DATA / "abdomen_small_ct.nii.gz", "--views", "4", "--det", "64",
                    "--pitch", "8", "--voxel", "6", "--out", out)
    assert again.returncode == ExitCode.BAD_INPUT and "holds files already" in again.stderr
    assert "--overwrite" in again.stderr and "projected" not in again.stderr  # refused before any work
    assert json.loads(run_cli("info", out, "--json").stdout)["views"] == 8


def test_bad_options_and_data_are_refused_before_torch_loads(case, tmp_path):
    """The option checks, then the data, reference and grid checks, run before the methods' modules (and
    torch, ~2-3 s) are imported: a typo or a broken file costs the user a second at most, and the
    refusal is the same lone `failed` event."""
    import shutil
    import subprocess
    import sys

    import numpy as np

    from worker_case import REPO, cli_env, write_with_bad_voxel

    broken = tmp_path / "broken_case"
    shutil.copytree(case, broken)
    # a fifth of a view without values: broken data, not a panel's dead pixels
    write_with_bad_voxel(case / "projections.mha", broken / "projections.mha", (3, slice(0, 10)), np.nan)
    probe = ("import sys; from CTNeRFReconLib.cli import main; code = main(sys.argv[1:]); "
             "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', file=sys.stderr); "
             "sys.exit(code)")
    for data, args, words in (
            (case, ["--setting", "no_such_field=1"], "no_such_field"),
            (case, ["--method", "no_such_method"], "no_such_method"),
            (case, ["--method", "fdk", "--tv-weight", "0.1"], "--tv-weight"),
            (case, ["--preset", "fastest"], "fastest"), (case, ["--iterations", "0"], "--iterations"),
            (broken, [], "NaN"), (tmp_path / "no_such_case", [], "no_such_case"),
            (case, ["--reference", tmp_path / "no_such_ct.nrrd"], "no_such_ct"),
            (case, ["--grid-size", "0", "4", "4"], "grid")):
        res = subprocess.run([sys.executable, "-c", probe, "reconstruct", str(data), "--out",
                              str(tmp_path / "refused"), *map(str, args)], cwd=REPO, env=cli_env(),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == ExitCode.BAD_INPUT, (args, res.stderr)
        assert words in res.stderr and "torch not loaded" in res.stderr, (data, args, res.stderr)
        assert not (tmp_path / "refused" / "volume.nrrd").exists()


def test_nerf_settings_from_the_command_line_are_checked_before_any_work(case, tmp_path):
    """--setting NAME=VALUE, --no-prior and --no-coarse-to-fine reach the nerf configuration; a bad one
    is refused (exit 2) with the flag and the fix, and no run folder is written."""
    for args, words in ((["--setting", "refine_fraction"], ("NAME=VALUE",)),
                        (["--setting", "no_such_field=1"], ("unknown nerf setting", "no_such_field")),
                        (["--setting", "iterations=abc"], ("iterations", "not a whole number")),
                        (["--setting", "coarse_levels=[4,\"x\"]"], ("coarse_levels", "list of numbers")),
                        (["--setting", "tv_edge=-0.1"], ("tv_edge", "below 0")),
                        (["--method", "fdk", "--no-prior"], ("--no-prior", "nerf only")),
                        (["--method", "fdk", "--setting", "iterations=3"], ("--setting", "nerf only"))):
        out = tmp_path / "refused"
        res = run_cli("reconstruct", case, "--out", out, *args)
        assert res.returncode == ExitCode.BAD_INPUT, (args, res.stderr)
        assert all(w in res.stderr for w in words), (args, res.stderr)
        assert not (out / "volume.nrrd").exists()
    out = tmp_path / "ran"
    res = run_cli("reconstruct", case, "--out", out, "--no-prior", "--no-coarse-to-fine", "--setting",
                  "iterations=12", "--setting", "eval_every=4", "--snapshot-every", "0", "--quiet", timeout=240)
    assert res.returncode == 0, res.stderr
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["use_generator"] is False and settings["coarse_levels"] == [] and settings["iterations"] == 12
