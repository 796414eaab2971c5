"""A flat panel's dead pixels and lines: missing measurements, not a reason to refuse a scan.

A few pixels without a value (NaN or infinity in line integrals, a pixel dead in the flat field) are
marked as defects, filled from the nearest measured pixel of their view for FDK and the previews, and
left out of nerf's fit; more than `MAX_DEFECT_FRACTION` of a view is still refused (test_bad_input.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from CTNeRFReconLib.cli import info_dict
from CTNeRFReconLib.data import ScanData
from CTNeRFReconLib.formats import ScanFormatError, load_scan
from CTNeRFReconLib.formats.validate import MAX_DEFECT_FRACTION
from CTNeRFReconLib.methods import RunContext, get_method
from CTNeRFReconLib.metrics import psnr3d
from CTNeRFReconLib.nerf.config import NerfConfig
from CTNeRFReconLib.nerf.train import NerfTrainer
from CTNeRFReconLib.slicer_bridge.projections import describe_summary
from nerf_case import small_phantom_case


def _stack(tmp_path, proj, **extra):
    np.save(tmp_path / "p.npy", proj)
    desc = {"projections": "p.npy", **extra,
            "geometry": {"type": "circular", "sid": 500, "sdd": 800, "angles_deg": [0, 90, 180, 270],
                         "pixel_pitch": [2.0, 2.0]}}
    (tmp_path / "scan.json").write_text(json.dumps(desc))
    return tmp_path / "scan.json"


def _lines(rows=16, cols=16):
    """Smooth line integrals, as a real object gives (white noise would hold pixels far below both
    neighbours, which `stuck_at_air` reads as stuck): a blob whose centre moves from view to view."""
    r, c = np.mgrid[:rows, :cols].astype(np.float32)
    views = [2.0 * np.exp(-((r - rows / 2) ** 2 + (c - cols / 2 - 2 * np.cos(a)) ** 2) / (0.1 * rows * cols))
             for a in np.linspace(0, 2 * np.pi, 4, endpoint=False)]
    return (np.stack(views) + 0.05).astype(np.float32)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_few_pixels_without_a_value_are_marked_and_read_from_their_neighbour(tmp_path, value):
    lines = _lines()
    proj = lines.copy()
    proj[2, 5, 7] = value
    proj[0, 0, 3] = value
    scan = load_scan(_stack(tmp_path, proj))
    assert scan.defects is not None and scan.defects.sum() == 2
    assert scan.defects[2, 5, 7] and scan.defects[0, 0, 3]
    assert np.isfinite(scan.projections).all()
    # the nearest measured pixel of the same view (one of the four at distance 1)
    assert scan.projections[2, 5, 7] in {lines[2, 4, 7], lines[2, 6, 7], lines[2, 5, 6], lines[2, 5, 8]}
    assert scan.projections[0, 0, 3] in {lines[0, 1, 3], lines[0, 0, 2], lines[0, 0, 4]}
    unchanged = ~scan.defects
    assert np.array_equal(scan.projections[unchanged], lines[unchanged])
    assert any("2 detector pixels in 2 of 4 views hold no value" in n for n in scan.notes)
    said = info_dict(scan, support=False)  # what `info --json` prints and the panel reads
    assert said["defect_pixels"] == 2
    assert "2 pixel readings without a measurement (dead pixels: left out of the fit)" in describe_summary(said)


def test_a_view_with_more_missing_than_dead_lines_explain_is_refused(tmp_path):
    proj = _lines()
    too_many = int(np.ceil(MAX_DEFECT_FRACTION * proj[0].size)) + 1
    proj[1].reshape(-1)[:too_many] = np.nan
    with pytest.raises(ScanFormatError) as info:
        load_scan(_stack(tmp_path, proj))
    assert info.value.field == "projections" and "view 1 has 2.7% of its pixels without a value" in str(info.value)
    assert "p.npy" in str(info.value) and "`--drop-views 1`" in info.value.fix
    # left out, the rest is read; kept for looking at (info, the panel's stack), it is named
    assert load_scan(tmp_path / "scan.json", drop_views=(1,)).n_views == 3
    assert list(load_scan(tmp_path / "scan.json", keep_bad_views=True).bad_views) == [1]


def test_a_frame_of_intensities_taken_without_the_beam_is_a_bad_view(tmp_path):
    """Counts at the dark level throughout one view (the beam was off, or the frame was stored as the dark
    level): no object 13.8 thick everywhere (the transmission's floor), but a view to leave out."""
    lines = _lines()
    raw = (2e4 * np.exp(-lines) + 100).astype(np.float32)
    raw[1] = 100.0 + np.random.default_rng(0).normal(0.0, 3.0, raw[1].shape)  # the dark level and its noise
    raw[3, :2, :2] = 90.0  # a few starved pixels in a good view stay measured (the floor)
    with pytest.raises(ScanFormatError, match=r"view 1 has 100\.0% of its pixels without a value") as refused:
        load_scan(_stack(tmp_path, raw, kind="intensity", i0=2e4 + 100, dark=100.0))
    assert "`--drop-views 1`" in refused.value.fix
    scan = load_scan(tmp_path / "scan.json", drop_views=(1,))
    assert scan.n_views == 3 and not scan.defects.any() and np.isclose(scan.projections[2, 0, 0], -np.log(1e-6))
    assert np.allclose(scan.projections[0], lines[0], atol=1e-4)


def test_a_dropped_frame_is_named_by_info_and_the_panel_and_refused_until_left_out(tmp_path, capsys):
    """A view entirely zero (a frame the acquisition lost): nothing to fit. `reconstruct` refuses it before
    any work with the --drop-views that leaves it out; `info` and the panel's scan line name it instead of
    refusing, and work out the rest (grid, support) without it."""
    from CTNeRFReconLib.cli import main
    from CTNeRFReconLib.slicer_bridge.projections import load_scan_file

    proj = _lines()
    proj[2] = 0.0
    path = _stack(tmp_path, proj)
    with pytest.raises(ScanFormatError, match=r"view 2 is entirely zero \(a dropped frame\?\)") as refused:
        load_scan(path, drop_views=(0,))
    assert "`--drop-views 0 2`" in refused.value.fix and "Leave out views" in refused.value.fix
    assert load_scan_file(path).bad_views == {2: "is entirely zero (a dropped frame?)"}
    kept = load_scan(path, drop_views=(0,), keep_bad_views=True)  # numbered anew with the views left
    assert kept.bad_views == {1: "is entirely zero (a dropped frame?)"} and kept.n_views == 3
    assert main(["info", str(path), "--no-support"]) == 0
    out = capsys.readouterr().out
    assert "3 views of 16 rows" in out and "--drop-views 2:" in out and "  view 2 is entirely zero" in out
    assert main(["info", str(path), "--no-support", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["views"] == 3 and said["bad_views"] == {"2": "is entirely zero (a dropped frame?)"}
    assert ("view 2 is entirely zero (a dropped frame?): nothing to reconstruct from; Start refuses the scan until "
            "Advanced > Leave out views holds 2") in describe_summary(said)
    assert main(["info", str(path), "--no-support", "--json", "--drop-views", "2"]) == 0
    assert "bad_views" not in json.loads(capsys.readouterr().out)


def test_a_pixel_dead_in_the_flat_field_is_a_defect_in_every_view(tmp_path):
    lines = _lines()
    raw = (2e4 * np.exp(-lines) + 100).astype(np.float32)
    flat = np.full((16, 16), 2e4 + 100.0)
    flat[3, 9] = 100.0  # no brighter than the dark level: the pixel never counted
    raw[1, 12, 2] = np.inf
    np.save(tmp_path / "flat.npy", flat)
    scan = load_scan(_stack(tmp_path, raw, kind="intensity", flat="flat.npy", dark=100.0))
    assert scan.defects[:, 3, 9].all() and scan.defects[1, 12, 2] and scan.defects.sum() == 5
    good = ~scan.defects
    assert np.allclose(scan.projections[good], lines[good], atol=1e-4)
    flat[:, :2] = 0.0  # two dead columns of 16 and the pixel: 33 of 256, 12.9 % of the panel
    np.save(tmp_path / "flat.npy", flat)
    with pytest.raises(ScanFormatError) as info:
        load_scan(_stack(tmp_path, raw, kind="intensity", flat="flat.npy", dark=100.0))
    assert info.value.field == "flat" and "12.9%" in str(info.value)


def _with_dead_column(scan: ScanData, fill: float, detect: bool = True) -> ScanData:
    """The scan with detector column 20 (through the phantom, in every view) set to `fill`; `detect=False`:
    as a tool that does not look for dead pixels would fit it (no defects, the values as they are)."""
    proj = scan.projections.copy()
    proj[:, :, 20] = fill
    if detect:
        return ScanData(proj, scan.geometry, "synthetic", "<dead column>")
    blind = ScanData(scan.projections.copy(), scan.geometry, "synthetic", "<dead column, not looked for>")
    blind.projections = proj
    return blind


# the small phantom's quick schedule (test_nerf.py's FAST, with the prior and TV its 3 dB margin was set with)
QUICK = dict(preset="preview", iterations=200, rays_start=4096, rays_end=8192, snapshot_every=0, eval_every=50,
             fdk_init_iterations=0, checkpoint_every=0, refine_fraction=0.5, tv_edge=0.0)


def _nerf(scan, grid):
    return get_method("nerf").reconstruct(scan, grid, RunContext(device="cpu", seed=0, settings=dict(QUICK)))


def test_nerf_leaves_a_dead_column_out_and_does_as_well_as_with_it_measured():
    scan, ref = small_phantom_case(noise_i0=2e4)
    dead = _with_dead_column(scan, np.nan)
    assert dead.defects[:, :, 20].all() and dead.defects.sum() == scan.n_views * scan.geometry.det_shape[0]
    trainers = [NerfTrainer(s, ref.grid, NerfConfig(iterations=10), RunContext()) for s in (scan, dead)]
    every_view = np.arange(scan.n_views)
    intact_rays, dead_rays = (t._rays_for(s, every_view) for t, s in zip(trainers, (scan, dead)))
    (meas_intact, hit_intact), (meas_dead, hit_dead) = ((r.targets, r.hit_mask) for r in (intact_rays, dead_rays))
    assert np.array_equal(hit_dead, hit_intact & ~dead.defects) and hit_intact[:, :, 20].sum() > 0
    assert len(meas_dead) == len(meas_intact) - int(hit_intact[:, :, 20].sum())
    # the same column stuck at zero (what a reader that turns NaN into 0 gives) is found from the data
    stuck = _with_dead_column(scan, 0.0)
    assert stuck.defects is not None and stuck.defects[:, :, 20].sum() >= 0.4 * dead.defects.sum()  # the rows in its shadow
    assert not np.delete(stuck.defects, 20, axis=2).any()
    p_intact = psnr3d(ref.array, _nerf(scan, ref.grid).array)
    p_dead = psnr3d(ref.array, _nerf(dead, ref.grid).array)
    p_stuck = psnr3d(ref.array, _nerf(stuck, ref.grid).array)
    # fitted as zeros (air), as a tool that does not look for them would: a ring through the phantom
    p_blind = psnr3d(ref.array, _nerf(_with_dead_column(scan, 0.0, detect=False), ref.grid).array)
    assert p_dead > p_intact - 0.3, (p_dead, p_intact)
    assert p_stuck > p_intact - 0.5, (p_stuck, p_intact)
    assert p_dead > p_blind + 1.0, (p_dead, p_blind)
    # FDK reads the column from its neighbour: close to the intact scan's, far from the zeros'
    fdk = get_method("fdk")
    f_intact, f_dead, f_blind = (psnr3d(ref.array, fdk.reconstruct(s, ref.grid, RunContext()).array)
                                 for s in (scan, dead, _with_dead_column(scan, 0.0, detect=False)))
    assert f_dead > f_intact - 0.3 and f_dead > f_blind + 1.0, (f_intact, f_dead, f_blind)


def test_a_run_with_views_left_out_is_checked_and_exported_without_them(tmp_path, capsys):
    """`check` and `export` read the run's data again: without the views the run left out (run.json), the
    check numbers views as the run's own did, and the checkpoint's data fingerprint matches."""
    from CTNeRFReconLib.cli import main
    from worker_case import run_cli, write_small_case

    case = write_small_case(tmp_path / "case")
    run = tmp_path / "run"
    res = run_cli("reconstruct", case, "--out", run, "--method", "nerf", "--preset", "preview", "--iterations", "6",
                  "--device", "cpu", "--drop-views", "5", "17")
    assert res.returncode == 0, res.stderr
    assert main(["check", str(run), "--json"]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert len(checked["rmse"]) == 22
    assert main(["export", str(run), "--spacing", "8", "--out", str(tmp_path / "field.nrrd"), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["source"] == "checkpoint" and (tmp_path / "field.nrrd").is_file(), exported


def test_a_thin_air_gap_in_the_orbit_plane_is_not_a_stuck_row():
    """The one detector row whose rays stay in the orbit's plane in every view reads air in every view where
    a thin gap lies in that plane: object, not a defect. A row elsewhere that does so is stuck. A row that
    reads exactly zero in every view, without the photon noise air has, is stuck also in the plane."""
    i0 = 2e4
    scan, _ = small_phantom_case(noise_i0=i0)
    plane_row = int(round(scan.geometry.project_points(np.zeros(3), 0)[0, 0]))
    rng = np.random.default_rng(5)
    for row, noisy_air, stuck in ((plane_row, True, False), (plane_row + 8, True, True), (plane_row, False, True)):
        proj = scan.projections.copy()
        shape = proj[:, row, :].shape
        # a gap's rays cross air and count photons as air does; a dead row reads one value
        proj[:, row, :] = -np.log(rng.poisson(i0, shape).clip(1, None) / i0) if noisy_air else 0.0
        found = ScanData(proj, scan.geometry, "synthetic", "<a row at air>").defects
        assert (found is not None and found[:, row].any()) == stuck, (row, plane_row, noisy_air)
        if found is not None:
            assert not np.delete(found, row, axis=1).any()


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} not found (the shared CT data sits beside the repo)")
@pytest.mark.parametrize("taps", [[0.15, 0.7, 0.15], [0.25, 0.5, 0.25]])
def test_noise_a_blur_made_smooth_is_not_taken_for_still_pixels(tmp_path, taps):
    """A panel's scintillator spreads each photon's light over neighbouring pixels: a pixel's noise is smaller
    and moves with its neighbours'. Read against the right noise, none of them is still. The first version read
    the noise from the air's spreads above a tenth of their 90th percentile, which on the abdomen are the
    pixels an object's edge crosses in some views, and took 37 % of this 12-view abdomen for still (5275 of
    14400 pixels with the mild blur)."""
    pytest.importorskip("itk")
    import sys

    import SimpleITK as sitk
    from scipy import ndimage

    from CTNeRFReconLib.data import still_pixels

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from rtk_reference import make_case  # RTK's projector, without noise

    case = make_case(DATA / "abdomen_ct.nii.gz", tmp_path / "case", views=12, det=120, pitch=6.4, voxel=6.0, i0=0)
    exact = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "projections.mha"))).astype(np.float64)
    kernel = np.asarray(taps)
    counts = np.random.default_rng(2).poisson(1e5 * np.exp(-exact)).astype(np.float64)
    blurred = ndimage.convolve1d(ndimage.convolve1d(counts, kernel, axis=1), kernel, axis=2)
    proj = (-np.log(blurred.clip(1.0) / 1e5)).astype(np.float32)
    assert not still_pixels(proj).any()
    proj[:, 60, 50] = 3.0  # and a stuck pixel is still found among them
    assert still_pixels(proj)[60, 50] and still_pixels(proj).sum() == 1


def test_pixels_stuck_at_any_value_are_found_by_the_noise_they_lack():
    """Every measured reading carries photon noise. A pixel that reads one value in every view is stuck,
    whatever the value and wherever it is: high (which `stuck_at_air` cannot tell from a wire on the axis),
    a row near the orbit plane, a seam wider than `STUCK_MAX_RUN`. Nothing is found on the intact noisy
    scan, on exact projections (no noise to miss), or with too few views to tell."""
    from CTNeRFReconLib.data import STILL_MIN_VIEWS, stuck_at_air

    scan, _ = small_phantom_case(det=160, noise_i0=2e4)
    plane_row = int(round(scan.geometry.project_points(np.zeros(3), 0)[0, 0]))
    proj = scan.projections.copy()
    proj[:, 80, 75] = 3.0  # in the body's shadow, stuck high
    proj[:, 5, 150] = 1.0  # in air, stuck high
    proj[:, plane_row, 40:120] = 0.02  # a row through the orbit plane, stuck low
    proj[:, :, 100:106] = 0.0  # six adjacent dead columns
    made = np.zeros(proj.shape[1:], dtype=bool)
    made[80, 75] = made[5, 150] = True
    made[plane_row, 40:120] = True
    made[:, 100:106] = True
    found = ScanData(proj, scan.geometry, "synthetic", "<stuck>")
    assert found.defects is not None and np.array_equal(found.defects[0], made)
    assert (found.defects == found.defects[:1]).all()  # the same in every view
    assert any("without the photon noise" in n for n in found.notes), found.notes
    older = stuck_at_air(proj, None)  # what the neighbours' test alone finds: not the high pixels, nor the row
    assert not older[80, 75] and not older[5, 150] and not older[plane_row, 40:120].any()
    assert ScanData(scan.projections, scan.geometry, "synthetic", "<intact>").defects is None
    exact, _ = small_phantom_case(det=160)
    still = exact.projections.copy()
    still[:, 80, 75] = 3.0
    assert ScanData(still, exact.geometry, "synthetic", "<exact>").defects is None
    few, _ = small_phantom_case(views=STILL_MIN_VIEWS - 1, det=160, noise_i0=2e4)
    high = few.projections.copy()
    high[:, 80, 75] = 3.0
    assert ScanData(high, few.geometry, "synthetic", "<few views>").defects is None


@pytest.mark.parametrize("width", [3, 4])
def test_a_seam_of_adjacent_dead_columns_is_found_whole(width):
    """A tiled panel's seam or a dead readout group: up to `STUCK_MAX_RUN` adjacent columns at zero are found,
    every one of them, in the object's shadow; nothing else is."""
    from CTNeRFReconLib.data import STUCK_MAX_RUN

    assert width <= STUCK_MAX_RUN
    scan, _ = small_phantom_case(det=160, noise_i0=2e4)  # wide enough that the seam is under 2 % of the panel
    seam = slice(70, 70 + width)
    proj = scan.projections.copy()
    proj[:, :, seam] = 0.0
    found = ScanData(proj, scan.geometry, "synthetic", "<a seam>").defects
    assert found is not None and not np.delete(found, np.arange(70, 70 + width), axis=2).any()
    shadow = scan.projections[:, :, seam] > 0.2 * scan.projections.max()  # where the body is behind the seam
    assert found[:, :, seam][shadow].mean() > 0.95, [found[:, :, c].sum() for c in range(70, 70 + width)]


def test_the_command_line_says_how_many_and_writes_them_into_run_json(tmp_path):
    """A real RTK case through the worker: a dead stretch of a column in every view (11 of its 48 pixels: a
    whole column of this 48-column detector would be over the 2 %) is a line on the console, the count in
    run.json's data, and the run finishes."""
    from worker_case import run_cli, write_small_case, write_with_bad_voxel

    case = write_small_case(tmp_path / "case")
    write_with_bad_voxel(case / "projections.mha", case / "projections.mha", (slice(None), slice(10, 21), 30), np.nan)
    res = run_cli("reconstruct", case, "--out", tmp_path / "run", "--method", "fdk")
    assert res.returncode == 0, res.stderr
    assert f"{24 * 11} pixel readings (pixels x views) hold no measurement (dead pixels): left out of the fit" in res.stderr
    said = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert said["defect_pixels"] == 24 * 11 and any("hold no value" in n for n in said["notes"])
    assert (tmp_path / "run" / "volume.nrrd").exists()


def test_a_mask_given_with_the_scan_is_filled_and_checked():
    scan, _ = small_phantom_case()
    given = np.zeros(scan.projections.shape, dtype=bool)
    given[:, 10, 5] = True
    proj = scan.projections.copy()
    proj[:, 10, 5] = 99.0  # what a panel's defect map says is not a measurement
    marked = ScanData(proj, scan.geometry, "synthetic", "<defect map>", defects=given)
    assert np.array_equal(marked.defects, given) and marked.projections.max() < 99.0
    with pytest.raises(ValueError, match="bool mask"):
        ScanData(proj, scan.geometry, "synthetic", "<defect map>", defects=given[:, :, :-1])
    # a stack that does not match its geometry is refused as such, before any defect is looked for
    with pytest.raises(ValueError, match="projections but the geometry has"):
        ScanData(np.concatenate([proj, proj[:1]]), scan.geometry, "synthetic", "<one view too many>")


def test_more_stuck_pixels_than_a_panels_lines_are_kept_as_measured():
    """Many pixels that pass the stuck test (here every fourth column at zero: 25 % of the panel) are not a
    panel's dead lines; dropping them would drop a quarter of the data, so they stay, with a note."""
    scan, _ = small_phantom_case()
    proj = scan.projections.copy()
    proj[:, :, ::4] = 0.0
    kept = ScanData(proj, scan.geometry, "synthetic", "<slotted>")
    assert kept.defects is None and any("kept as measured" in n for n in kept.notes)


def test_a_pixel_without_a_value_in_the_flat_frame_is_dead_in_every_view(tmp_path):
    lines = _lines()
    raw = (2e4 * np.exp(-lines) + 100).astype(np.float32)
    flat = np.full((16, 16), 2e4 + 100.0)
    flat[7, 7] = np.nan
    np.save(tmp_path / "flat.npy", flat)
    scan = load_scan(_stack(tmp_path, raw, kind="intensity", flat="flat.npy", dark=100.0))
    assert scan.defects[:, 7, 7].all() and scan.defects.sum() == 4


def test_r2_gaussian_meta_data_under_another_name_loads(tmp_path):
    from CTNeRFReconLib.formats.r2gaussian import write_r2gaussian

    sc = {"mode": "cone", "DSD": 1500.0, "DSO": 1000.0, "nDetector": [16, 16], "sDetector": [32.0, 32.0],
          "nVoxel": [8, 8, 8], "sVoxel": [8.0, 8.0, 8.0]}
    folder = write_r2gaussian(tmp_path / "r2", _lines(), np.arange(4.0) * 90, sc)
    (folder / "meta_data.json").rename(folder / "meta.json")
    assert load_scan(folder).n_views == 4


def test_views_the_user_drops_are_left_out_of_everything(tmp_path):
    """`--drop-views`: the projection check names a bad view; the user leaves it out and the run sees only the
    others (FDK, nerf, the support alike), numbered anew, and says which were dropped."""
    from worker_case import run_cli, write_edited_case, write_small_case

    case = write_small_case(tmp_path / "case")
    res = run_cli("reconstruct", case, "--out", tmp_path / "run", "--method", "fdk", "--drop-views", "5", "17")
    assert res.returncode == 0, res.stderr
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data"]["views"] == 22 and any("views [5, 17] left out (--drop-views)" in n for n in run["data"]["notes"])
    started = json.loads(res.stdout.splitlines()[0])
    assert started["event"] == "started" and started["views"] == 22
    refused = run_cli("reconstruct", case, "--out", tmp_path / "run2", "--method", "fdk", "--drop-views", "24")
    assert refused.returncode == 2 and "--drop-views" in refused.stderr and "views 0 to 23" in refused.stderr
    with_reference = ("geometry.xml", "reference.nrrd")  # the edited cases are scored against it

    # a blank frame (view 12): refused before any work, naming the --drop-views that leaves it out as the
    # data number views, with the views already left out kept in the list; then it runs
    blank = write_edited_case(case, tmp_path / "blank", lambda stack: stack[12].fill(0.0), with_reference)
    res = run_cli("reconstruct", blank, "--out", tmp_path / "run3", "--method", "fdk", "--drop-views", "5")
    assert res.returncode == 2 and "view 12 is entirely zero" in res.stderr and "--drop-views 5 12" in res.stderr
    assert not (tmp_path / "run3" / "volume.nrrd").exists()
    res = run_cli("reconstruct", blank, "--out", tmp_path / "run4", "--method", "fdk", "--drop-views", "5", "12")
    assert res.returncode == 0, res.stderr
    # a frame flat-fielded with another exposure's flat (log 2 added): the end-of-run check names it, in the
    # data's numbering, with the --drop-views that leaves it out
    offset = write_edited_case(case, tmp_path / "offset", lambda stack: np.add(stack[12], np.log(2), out=stack[12]),
                               with_reference)
    res = run_cli("reconstruct", offset, "--out", tmp_path / "run5", "--method", "fdk", "--drop-views", "5")
    assert res.returncode == 0, res.stderr
    assert "view 11 (view 12 of the data) leaves" in res.stderr and "`--drop-views 5 12` leaves it out" in res.stderr
    # and nerf's console names it while it trains already (the residuals of a snapshot), once
    res = run_cli("reconstruct", offset, "--out", tmp_path / "run6", "--method", "nerf", "--preset", "preview",
                  "--iterations", "30", "--snapshot-every", "10", "--residuals-every", "0.001", "--drop-views", "5")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count(": view 12 of the data at ") == 1 and "residuals at iteration 10: view 12" in res.stderr
    scan = load_scan(case)
    kept = scan.without_views([0, 3])
    assert kept.n_views == scan.n_views - 2 and np.array_equal(kept.projections[0], scan.projections[1])
    assert np.allclose(kept.geometry.sources[2], scan.geometry.sources[4])
