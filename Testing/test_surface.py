"""Surface models: closed iso-surfaces of an analytic ellipsoid, from the volume path (a voxelised
phantom written as a run's volume.nrrd) and from a short nerf run's trained field (exact projections).
Area and enclosed volume (vtkMassProperties) within 2 % of the analytic values; the symmetric 95th
percentile distance to the analytic surface below half the output voxel size."""
from __future__ import annotations

import json

import numpy as np
import pytest

import field_case as fc
from CTNeRFReconLib.cli import main
from CTNeRFReconLib.data import Volume
from CTNeRFReconLib.geometry import VolumeGrid
from CTNeRFReconLib.phantom import Ellipsoid, voxelize
from CTNeRFReconLib.surface import extract_surface, parse_threshold, read_surface, surface_stats
from CTNeRFReconLib.volume_io import write_volume

pytest.importorskip("vtkmodules", reason="surface models need VTK")


def _check(poly, centre, axes, voxel: float, label: str, tolerance: float = 0.02):
    stats = surface_stats(poly)
    area, vol = fc.ellipsoid_area(*axes), fc.ellipsoid_volume(*axes)
    hd = fc.symmetric_hd95(poly, centre, axes)
    print(f"{label}: area {stats['area_mm2']:.1f} mm^2 ({stats['area_mm2'] / area - 1:+.2%}), volume "
          f"{stats['volume_mm3']:.0f} mm^3 ({stats['volume_mm3'] / vol - 1:+.2%}), HD95 {hd:.3f} mm, "
          f"{stats['triangles']} triangles")
    assert abs(stats["area_mm2"] / area - 1) < tolerance
    assert abs(stats["volume_mm3"] / vol - 1) < tolerance
    assert hd < voxel / 2


def test_surface_of_a_voxelised_ellipsoid_volume_path(tmp_path, capsys):
    # a "run" with only a volume (as FDK leaves): the volume path of `surface`
    axes, centre = (26.0, 19.0, 15.0), (3.3, -2.1, 1.7)  # off the voxel lattice on purpose
    grid = VolumeGrid.centered((36, 28, 24), (2.0,) * 3)
    vol = Volume(voxelize([Ellipsoid(centre, axes, 0.02)], grid, supersample=4), grid)
    run = tmp_path / "run"
    write_volume(vol, run / "volume.nrrd")
    out = tmp_path / "body.vtp"
    assert main(["surface", str(run), "--threshold", "0.01", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"] == "volume" and "resampling volume.nrrd" in res["note"]
    _check(read_surface(out), centre, axes, 2.0, "voxelised phantom, 2 mm")
    # stl and obj carry the same surface
    for suffix in (".stl", ".obj"):
        # (a negative value needs the '=' form, or argparse takes it for an option)
        assert main(["surface", str(run), "--threshold=-500HU", "--out", str(tmp_path / f"b{suffix}")]) == 0
        capsys.readouterr()
        s = surface_stats(read_surface(tmp_path / f"b{suffix}"))
        assert abs(s["volume_mm3"] / fc.ellipsoid_volume(*axes) - 1) < 0.02


def test_surface_of_the_trained_field(tmp_path, capsys):
    run = fc.cached_run("nerf", 300)
    out = tmp_path / "body.vtp"
    assert main(["surface", str(run), "--threshold", "auto", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"] == "checkpoint" and res["threshold_from"] == "Otsu inside the support"
    assert 0.008 < res["threshold"] < 0.012  # between air (0) and the body (0.02 /mm)
    _check(read_surface(out), fc.BODY.center, fc.BODY.semi_axes, fc.VOXEL, "nerf field, auto threshold")
    # finer than the output grid, in a box around the insert (body + insert = 0.04 /mm): a small
    # structure (semi-axes 7, 5, 6 mm, 3.5 to 2.5 training voxels) is blurred more by a short run; it is
    # held to the same HD95 bound but to 10 % in area and volume: they come out about 3 % and 5 % small
    # after 300 iterations (measured: area -2.7 %, volume -5.4 %)
    out2 = tmp_path / "insert.stl"
    assert main(["surface", str(run), "--threshold", "0.03", "--spacing", "1", "--roi", "8", "-5", "3", "24", "20",
                 "22", "--out", str(out2)]) == 0
    capsys.readouterr()
    _check(read_surface(out2), fc.INSERT.center, fc.INSERT.semi_axes, fc.VOXEL, "nerf field, insert at 1 mm", 0.1)


def test_thresholds_and_refusals(tmp_path, capsys):
    assert parse_threshold("bone") == pytest.approx(0.026)
    assert parse_threshold("skin") == pytest.approx(0.01)
    assert parse_threshold("300HU") == pytest.approx(0.026) and parse_threshold("0.03") == 0.03
    grid = VolumeGrid.centered((8, 8, 8), (2.0,) * 3)
    run = tmp_path / "run"
    write_volume(Volume(np.zeros(grid.shape_zyx, np.float32), grid), run / "volume.nrrd")
    for extra, fld in ((["--threshold", "300"], "--threshold"), (["--threshold", "wood"], "--threshold"),
                       (["--decimate", "1.5"], "--decimate")):
        assert main(["surface", str(run), *extra, "--out", str(tmp_path / "s.vtp")]) == 2
        assert f"field '{fld}'" in capsys.readouterr().err
    assert main(["surface", str(run), "--out", str(tmp_path / "s.ply")]) == 2
    assert "'--out'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no voxel is above"):
        extract_surface(Volume(np.zeros(grid.shape_zyx, np.float32), grid), 0.01)
    assert not (tmp_path / "s.vtp").exists()


def test_bench_surface_says_which_truth_surface_is_missing_and_why():
    # the truth: a thick ball (0.04 /mm) and a thin plate (0.03 /mm) above a 0.026 threshold; "ours"
    # keeps the ball but leaves the plate at 0.022: the plate's surface is the missing one, and the
    # benchmark's diagnosis must say so with both peaks
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_surface import _points, grid_floor, missing_truth, surface_distances

    grid = VolumeGrid.centered((40, 40, 40), (2.0,) * 3)
    ball = voxelize([Ellipsoid((-15.0, 0.0, 0.0), (12.0, 12.0, 12.0), 0.04)], grid, supersample=2)
    plate = voxelize([Ellipsoid((18.0, 0.0, 0.0), (4.0, 25.0, 25.0), 1.0)], grid, supersample=2) > 0.5
    truth, ours = ball.copy(), ball.copy()
    truth[plate], ours[plate] = 0.03, 0.022
    truth_vol, ours_vol = Volume(truth, grid), Volume(ours, grid)
    truth_poly, ours_poly = extract_surface(truth_vol, 0.026), extract_surface(ours_vol, 0.026)
    points = _points(truth_poly)
    m = missing_truth(points, surface_distances(ours_poly, truth_poly)[1], truth_vol, ours_vol, voxel_mm=2.0)
    on_plate = points[:, 0] > 5.0
    assert 0.2 < m["missing_fraction"] < 0.9
    assert abs(m["missing_fraction"] - on_plate.mean()) < 0.05  # the missing surface is the plate's
    assert abs(m["missing_truth_peak_median"] - 0.03) < 1e-3
    assert abs(m["missing_ours_peak_median"] - 0.022) < 1e-3
    assert abs(m["found_truth_peak_median"] - 0.04) < 2e-3 and abs(m["found_ours_peak_median"] - 0.04) < 2e-3
    # the grid floor: the truth against itself is 0 on its own grid, and more than nothing but under a
    # voxel on a finer, shifted one (the ball and the plate are large and smooth)
    assert grid_floor(truth_vol, truth_poly, grid, 0.026)["hd95_mm"] == 0.0
    finer = VolumeGrid.centered((53, 53, 53), (1.5,) * 3, (0.4, -0.3, 0.2))
    assert 0.0 < grid_floor(truth_vol, truth_poly, finer, 0.026)["hd95_mm"] < 2.0


def _pieces(poly) -> int:
    from vtkmodules.vtkFiltersCore import vtkPolyDataConnectivityFilter

    f = vtkPolyDataConnectivityFilter()
    f.SetInputData(poly)
    f.SetExtractionModeToAllRegions()
    f.Update()
    return f.GetNumberOfExtractedRegions()


def _farthest(points, poly) -> float:
    """The largest distance (mm) from `points` to the surface `poly` (VTK's exact point-to-triangle
    distance)."""
    from vtkmodules.vtkFiltersCore import vtkImplicitPolyDataDistance

    d = vtkImplicitPolyDataDistance()
    d.SetInput(poly)
    return max(abs(d.EvaluateFunction(*map(float, p))) for p in points)


def test_thin_shells_and_small_pieces_survive_decimation_and_smoothing():
    # a cortical-bone-like shell 1.5 voxels thick round a cavity, and eight small balls one voxel in
    # radius, off the lattice: what a bone surface at 3 mm is mostly made of. The default surface must
    # keep every piece (quadric decimation collapsed small ones to nothing), stay within one voxel of
    # the undecimated, unsmoothed iso-surface everywhere, and keep its area and enclosed volume (a strong
    # windowed-sinc pass thinned the shell from both sides); the cavity subtracts from the volume
    from CTNeRFReconLib.surface import signed_volume

    voxel = 2.0
    balls = [Ellipsoid((28.0 * np.cos(a) + 0.3, 28.0 * np.sin(a) - 0.7, 9.0 * np.sin(3 * a) + 0.4), (2.0,) * 3, 0.04)
             for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)]
    shell = [Ellipsoid((0.3, -0.2, 0.5), (20.0,) * 3, 0.04), Ellipsoid((0.3, -0.2, 0.5), (17.0,) * 3, -0.04)]
    grid = VolumeGrid.centered((40, 40, 32), (voxel,) * 3)
    vol = Volume(voxelize(shell + balls, grid, supersample=4), grid)
    raw = extract_surface(vol, 0.02, smooth_iterations=0, decimate=0)
    default = extract_surface(vol, 0.02)
    assert _pieces(raw) == 10  # the shell's outer and inner surfaces, and the eight balls
    assert _pieces(default) == _pieces(raw)
    assert default.GetNumberOfPolys() < 0.6 * raw.GetNumberOfPolys()
    raw_stats, stats = surface_stats(raw), surface_stats(default)
    analytic = 4 / 3 * np.pi * (20.0 ** 3 - 17.0 ** 3 + 8 * 2.0 ** 3)
    print(f"raw: volume {raw_stats['volume_mm3']:.0f} (analytic {analytic:.0f}), area {raw_stats['area_mm2']:.0f}; "
          f"default: volume {stats['volume_mm3']:.0f}, area {stats['area_mm2']:.0f}, "
          f"{stats['triangles']} of {raw_stats['triangles']} triangles")
    assert abs(raw_stats["volume_mm3"] / analytic - 1) < 0.15
    assert signed_volume(default) > 0 and abs(signed_volume(default) / stats["volume_mm3"] - 1) < 1e-6
    assert abs(stats["volume_mm3"] / raw_stats["volume_mm3"] - 1) < 0.1
    assert abs(stats["area_mm2"] / raw_stats["area_mm2"] - 1) < 0.1
    from vtkmodules.util import numpy_support

    raw_points = numpy_support.vtk_to_numpy(raw.GetPoints().GetData())
    assert _farthest(raw_points[::3], default) < voxel


def test_a_mirroring_grid_direction_keeps_the_surface_facing_out():
    # an LPS-like grid flips two axes (a rotation), a grid with one axis reversed mirrors: the
    # surface's triangles must face out of the object either way, with the same enclosed volume
    from CTNeRFReconLib.surface import signed_volume

    axes, centre = (14.0, 10.0, 8.0), (1.3, -0.6, 0.9)
    volumes = []
    for flips in ((1, 1, 1), (-1, -1, 1), (-1, 1, 1)):
        d = np.diag(np.asarray(flips, dtype=float))
        base = VolumeGrid.centered((20, 16, 14), (2.0,) * 3)
        grid = VolumeGrid(base.shape_xyz, base.spacing_xyz, tuple(d @ np.asarray(base.origin_xyz)), d)
        poly = extract_surface(Volume(voxelize([Ellipsoid(centre, axes, 0.02)], grid, supersample=3), grid), 0.01)
        volumes.append(signed_volume(poly))
        bounds = poly.GetBounds()  # in the world, where the ellipsoid is, whatever the grid's direction
        assert abs((bounds[0] + bounds[1]) / 2 - centre[0]) < 0.5
    assert min(volumes) > 0
    assert max(volumes) / min(volumes) - 1 < 0.01
    assert abs(volumes[0] / fc.ellipsoid_volume(*axes) - 1) < 0.06  # 4 voxels across its short axis
