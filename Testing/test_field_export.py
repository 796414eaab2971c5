"""`export`: a run's trained field evaluated in any box at any voxel size, from its checkpoint (real files).

The phantom (Testing/field_case.py: an ellipsoid body with a denser insert, exact cone-beam line
integrals of 24 views) is reconstructed by a short nerf run on a 2 mm output grid; the field is then
exported over the reconstruction's box at 0.5 mm (4x finer) and compared with the phantom sampled at
0.5 mm, against the trilinear upsampling of the run's own volume.nrrd onto the same grid.
"""
from __future__ import annotations

import numpy as np
import pytest

import field_case as fc
from CTNeRFReconLib.cli import main
from CTNeRFReconLib.phantom import voxelize
from CTNeRFReconLib.volume_io import read_volume, resample_to_grid


@pytest.fixture(scope="module")
def nerf_run():
    return fc.cached_run("nerf", 300)


@pytest.fixture(scope="module")
def fdk_run():
    return fc.cached_run("fdk")


def _rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def test_export_at_four_times_finer_spacing_beats_trilinear(nerf_run, tmp_path, capsys):
    out = tmp_path / "fine.nrrd"
    box = ["0", "0", "0", "80", "68", "60"]  # the output grid's box, centre and size in mm
    assert main(["export", str(nerf_run), "--roi", *box, "--spacing", "0.5", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "trained field" in said.out + said.err and "checkpoint.pt" in said.out
    fine = read_volume(out)
    g = fine.grid
    assert g.shape_xyz == (160, 136, 120) and np.allclose(g.spacing_xyz, 0.5)
    assert np.allclose(g.origin_xyz, (-39.75, -33.75, -29.75))  # ITK origin: the centre of voxel 0
    truth = voxelize(fc.PHANTOM, g, supersample=1)
    upsampled = resample_to_grid(read_volume(nerf_run / "volume.nrrd"), g).array
    e_field, e_tri = _rmse(fine.array, truth), _rmse(upsampled, truth)
    print(f"RMSE against the phantom at 0.5 mm: field {e_field:.6f} /mm, trilinear upsampling of volume.nrrd "
          f"{e_tri:.6f} /mm")
    assert e_field < e_tri
    # the same field on the output grid is the run's own volume (the export is the run's export)
    same = tmp_path / "same.nrrd"
    assert main(["export", str(nerf_run), "--out", str(same)]) == 0
    assert np.allclose(read_volume(same).array, read_volume(nerf_run / "volume.nrrd").array, atol=1e-6)


def test_export_refuses_bad_input_before_any_work(nerf_run, tmp_path, capsys):
    out = tmp_path / "x.nrrd"
    cases = [
        (["--roi", "0", "0", "0", "10", "-1", "10"], "'--roi'", "size"),
        (["--roi", "500", "0", "0", "10", "10", "10"], "'--roi'", "outside"),
        (["--spacing", "0"], "'--spacing'", "positive"),
        (["--roi", "0", "0", "0", "1000", "1000", "1000", "--spacing", "0.05"], "'--spacing'", "voxels"),
    ]
    for extra, fld, word in cases:
        assert main(["export", str(nerf_run), *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"field {fld}" in err and word in err and "Fix:" in err, err
        assert not out.exists()
    assert main(["export", str(nerf_run), "--out", str(tmp_path / "x.png")]) == 2
    assert "'--out'" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "field 'RUN_DIR'" in capsys.readouterr().err
    # never overwrites without --overwrite; with it, replaces atomically
    out.write_bytes(b"keep me")
    assert main(["export", str(nerf_run), "--spacing", "4", "--out", str(out)]) == 2
    assert "exists already" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["export", str(nerf_run), "--spacing", "4", "--out", str(out), "--overwrite"]) == 0
    assert read_volume(out).grid.shape_xyz == (20, 17, 15)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_export_without_checkpoint_resamples_the_volume_and_says_so(fdk_run, tmp_path, capsys):
    out = tmp_path / "fdk_fine.nrrd"
    assert main(["export", str(fdk_run), "--roi", "8", "-5", "3", "20", "16", "18", "--spacing", "0.5",
                 "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "resampling volume.nrrd" in said.out and "no checkpoint" in said.out
    vol = read_volume(out)
    ref = resample_to_grid(read_volume(fdk_run / "volume.nrrd"), vol.grid).array
    assert np.allclose(vol.array, ref)


def test_a_refused_checkpoint_falls_back_to_the_volume_and_says_why(nerf_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(nerf_run, run)
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    out = tmp_path / "v.nrrd"
    assert main(["export", str(run), "--spacing", "4", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "resampling volume.nrrd" in said and "checkpoint was refused" in said and "corrupt" in said


def test_export_reuses_the_support_the_field_was_trained_with(nerf_run, tmp_path, capsys):
    """The checkpoint keeps the carved support (bit-packed): export evaluates the field with it instead of
    carving again, and it is the support a fresh carve finds; a tampered one is refused by name."""
    import shutil

    from CTNeRFReconLib.field_export import load_run_field
    from CTNeRFReconLib.nerf.checkpoint import read_checkpoint, save_checkpoint
    from CTNeRFReconLib.nerf.train import _SUPPORT_CACHE, carve_support

    rf = load_run_field(nerf_run)
    kept = rf.trainer.support
    assert kept.found and kept.extra.get("reused") is True
    _SUPPORT_CACHE.clear()  # carve the same scan afresh
    fresh, grid = carve_support(rf.trainer.scan, rf.trainer.out_grid, rf.trainer.cfg)
    assert "reused" not in fresh.extra and np.array_equal(fresh.mask, kept.mask)
    assert grid.to_dict() == rf.trainer.grid.to_dict()

    run = tmp_path / "run"
    shutil.copytree(nerf_run, run)
    ck = read_checkpoint(run / "checkpoint.pt")
    ck["support"]["mask"] = ck["support"]["mask"][:-3]  # a mask too short for its grid
    save_checkpoint(run / "checkpoint.pt", {k: v for k, v in ck.items() if k not in ("format", "version")})
    _SUPPORT_CACHE.clear()
    out = tmp_path / "v.nrrd"
    assert main(["export", str(run), "--spacing", "4", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "resampling volume.nrrd" in said and "support" in said and "bytes of mask" in said, said


def test_output_grid_loss_scores_the_same_field_three_ways(nerf_run, fdk_run):
    """benchmarks/output_grid_loss.py: volume.nrrd, the training-grid volume and the field at the
    reference's voxel centres. This run's output grid is the reference's (given with --reference), so
    volume.nrrd holds the field at exactly those centres and the two must score alike."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from output_grid_loss import output_grid_loss

    reference = nerf_run.parent / "data" / "reference.nrrd"
    result = output_grid_loss(nerf_run, reference, None, margin=2)
    scores = result["scores"]
    assert set(scores) == {"volume.nrrd", "training grid", "field at the reference's voxels"}
    assert abs(scores["volume.nrrd"]["psnr"] - scores["field at the reference's voxels"]["psnr"]) < 0.01, scores
    assert all(s["psnr"] > 20 for s in scores.values()), scores  # a trained field, not noise
    with pytest.raises(SystemExit, match="checkpoint"):
        output_grid_loss(fdk_run, reference, None, margin=2)
