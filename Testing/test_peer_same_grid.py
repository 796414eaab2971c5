"""benchmarks/bench_peer_same_grid.py: what a grid costs the exact truth written on it, scored by the
referee's own score.py (skipped when ../shared/bench is not beside the project)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_peer_same_grid import BENCH, grids_of_run, referee_score, truth_on  # noqa: E402

pytestmark = pytest.mark.skipif(not (BENCH / "score.py").exists(),
                                reason="../shared/bench/score.py not beside the project")


def _reference(path: Path) -> Path:
    """A 3 mm 'ground truth' with sharp edges and texture, centred on the isocentre, as make_rtk_case.py writes."""
    rng = np.random.default_rng(0)
    n = 40
    z, y, x = np.mgrid[:n, :n, :n] - (n - 1) / 2
    body = (x / 16) ** 2 + (y / 13) ** 2 + (z / 15) ** 2 < 1
    mu = np.where(body, 0.019 + 0.001 * ndi.gaussian_filter(rng.standard_normal((n, n, n)), 1.0), 0.0)
    mu[(abs(x - 4) < 3) & (abs(y) < 2) & (abs(z) < 8)] = 0.04  # a thin bright bar
    image = sitk.GetImageFromArray(mu.astype(np.float32))
    image.SetSpacing((3.0, 3.0, 3.0))
    image.SetOrigin((-(n - 1) * 1.5,) * 3)
    sitk.WriteImage(image, str(path))
    return path


def test_the_reference_grid_costs_nothing_and_a_finer_unaligned_one_costs_the_truth(tmp_path):
    score = referee_score(BENCH / "score.py")
    ref = _reference(tmp_path / "reference.nrrd")
    # the truth on its own grid scores as the truth (PSNR infinite or huge)
    same = tmp_path / "same.nrrd"
    truth_on(ref, ([40] * 3, [3.0] * 3, [-58.5] * 3), same)
    with np.errstate(divide="ignore"):  # an exact copy: zero error, infinite PSNR
        assert score(str(ref), str(same), margin=2)["psnr"] > 100
    # on a grid of 2.13 mm over the same box (the detector pitch at the isocentre of the referee's cases),
    # two trilinear interpolations blur it: a ceiling well below the truth's
    n = round(120 / 2.1333)
    fine = tmp_path / "fine.nrrd"
    sp = 120 / n
    truth_on(ref, ([n] * 3, [sp] * 3, [-60 + sp / 2] * 3), fine)
    ceiling = score(str(ref), str(fine), margin=2)
    assert 25 < ceiling["psnr"] < 60
    # half that voxel loses much less: the ceiling is the grid's, not the scorer's
    n2 = 2 * n
    finer = tmp_path / "finer.nrrd"
    truth_on(ref, ([n2] * 3, [sp / 2] * 3, [-60 + sp / 4] * 3), finer)
    assert score(str(ref), str(finer), margin=2)["psnr"] > ceiling["psnr"] + 3


def test_the_grids_of_a_run_are_read_from_its_run_json(tmp_path):
    run = {"grid": {"shape_xyz": [10, 12, 14], "spacing_xyz": [2.0, 2.0, 2.0], "origin_xyz": [-9.0, -11.0, -13.0],
                    "direction": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]},
           "method_report": {"support": {"found": True, "box_lo_mm": [-6.0, -8.0, -4.0], "box_hi_mm": [6.0, 8.0, 4.0],
                                         "box_shape_xyz": [4, 4, 2], "training_grid_shape_xyz": [4, 4, 2]}}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    grids = grids_of_run(tmp_path)
    assert grids["output"] == ([10, 12, 14], [2.0, 2.0, 2.0], [-9.0, -11.0, -13.0])
    size, spacing, origin = grids["training"]
    assert size == [4, 4, 2] and np.allclose(spacing, [3.0, 4.0, 4.0]) and np.allclose(origin, [-4.5, -6.0, -2.0])
    # a box grown past the support (cut ends or sides) is not the support's box: no training grid is guessed
    run["method_report"]["support"]["training_grid_shape_xyz"] = [4, 4, 3]
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert "training" not in grids_of_run(tmp_path)
    with pytest.raises(SystemExit, match="run.json: not found"):
        grids_of_run(tmp_path / "missing")
