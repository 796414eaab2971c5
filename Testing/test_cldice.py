"""clDice (centreline Dice, Shit et al. 2021) against a case computed by hand, and in structure scores."""
from __future__ import annotations

import numpy as np

from CTNeRFReconLib.data import Volume
from CTNeRFReconLib.geometry import VolumeGrid
from CTNeRFReconLib.metrics import cldice, structure_scores


def tube() -> np.ndarray:
    """A straight tube along x (array axis 2): a disk of radius 2 voxels, x = 5 ... 24 (20 voxels)."""
    a = np.zeros((11, 11, 30), dtype=bool)
    zz, yy = np.mgrid[:11, :11]
    a[(zz - 5) ** 2 + (yy - 5) ** 2 <= 4, 5:25] = True
    return a


def test_tube_against_itself_is_one():
    a = tube()
    assert cldice(a, a) == 1.0
    assert cldice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert cldice(a, np.zeros_like(a)) == 0.0


def test_broken_tube_by_hand():
    from skimage.morphology import skeletonize

    a = tube()
    b = a.copy()
    b[:, :, 13:17] = False  # a gap of 4 voxels, x = 13 ... 16
    # The premise of the hand computation: the skeleton of the tube is its axis (z = y = 5), one voxel
    # shorter at each end than the tube, x = 6 ... 23: 18 voxels.
    s = skeletonize(np.pad(a, 1))[1:-1, 1:-1, 1:-1] > 0
    assert s.sum() == 18 and set(map(tuple, np.argwhere(s)[:, :2])) == {(5, 5)}
    assert np.argwhere(s)[:, 2].min() == 6 and np.argwhere(s)[:, 2].max() == 23
    # By hand, reference L = the tube, prediction P = the broken copy:
    #   Tprec = |S(P) & L| / |S(P)| = 1 (P lies inside L, so its skeleton does too);
    #   Tsens = |S(L) & P| / |S(L)| = (18 - 4) / 18 = 7/9 (the gap removes 4 axis voxels, x = 13 ... 16);
    #   clDice = 2 Tprec Tsens / (Tprec + Tsens) = 2 (7/9) / (16/9) = 14/16 = 0.875.
    assert abs(cldice(a, b) - 0.875) < 1e-12
    # Dice hardly sees the break (4 of 20 slices gone: 2 x 16 / 36 = 0.889); a one-voxel gap still costs
    # clDice its share of the axis: Tsens = 17/18, clDice = 2 (17/18) / (35/18) = 34/35
    c = a.copy()
    c[:, :, 14] = False
    assert abs(cldice(a, c) - 34 / 35) < 1e-12


def test_cldice_in_label_structure_scores():
    grid = VolumeGrid.centered((30, 11, 11), (1.0, 1.0, 1.0))
    labels = tube().astype(np.float32)
    ref = Volume(np.where(labels > 0, 0.04, 0.02).astype(np.float32), grid)
    broken = ref.array.copy()
    broken[:, :, 13:17] = 0.02
    scores = structure_scores(ref, Volume(broken, grid), labels=Volume(labels, grid))
    assert set(scores) == {"label_1"}
    s = scores["label_1"]
    assert abs(s["cldice"] - 0.875) < 1e-12 and s["dice"] > 0.85
    assert structure_scores(ref, ref, labels=Volume(labels, grid))["label_1"]["cldice"] == 1.0
