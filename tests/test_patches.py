import numpy as np
import pytest

from medptq_monai.calibrate.patches import PatchPlan, sample_patches, split_counts, tile_starts
from medptq_monai.errors import CalibrationError

from conftest import ct_volume


def test_same_seed_same_patches_and_other_seed_differs():
    vol = ct_volume()
    plan = PatchPlan(roi_size=(32, 32, 32), num_patches=6, seed=3)
    a = list(sample_patches([vol], plan))
    b = list(sample_patches([vol], plan))
    c = list(sample_patches([vol], PatchPlan(roi_size=(32, 32, 32), num_patches=6, seed=4)))
    assert len(a) == 6 and all(p.shape == (1, 1, 32, 32, 32) and p.dtype == np.float32 for p in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_foreground_crops_hold_foreground_that_uniform_tiles_mostly_miss():
    """Sparse foreground on the real CT: voxels at the top of the HU window (bone / contrast, > 0.99)
    are 0.6 % of the volume and lie in under a quarter of the 8^3 tiles, so crops centred on them
    differ from uniformly chosen tiles (with 61 % of voxels above 0.1, any crop would hold some)."""
    vol, roi, threshold = ct_volume(), (8, 8, 8), 0.99
    fg = vol[0] > threshold
    tiles = tile_starts(vol.shape[1:], roi, 0.5)
    tiles_with_fg = np.mean([fg[a : a + 8, b : b + 8, c : c + 8].any() for a, b, c in tiles])
    assert fg.mean() < 0.01 and tiles_with_fg < 0.25  # the data make the two samplers distinguishable

    def holding_fg(fraction: float) -> list[bool]:
        plan = PatchPlan(roi_size=roi, num_patches=16, seed=0, foreground_fraction=fraction,
                         foreground_threshold=threshold)
        return [bool((p > threshold).any()) for p in sample_patches([vol], plan)]

    assert all(holding_fg(1.0))  # each crop contains the foreground voxel it is centred on
    assert sum(holding_fg(0.0)) < 8  # tiles: about tiles_with_fg of them (3 of 16 with seed 0)
    assert all(holding_fg(0.5)[:8])  # the foreground half comes first


def test_small_volume_is_zero_padded_to_roi():
    vol = np.ones((1, 10, 20, 5), np.float32)
    (patch,) = sample_patches([vol], PatchPlan(roi_size=(16, 16, 16), num_patches=1))
    assert patch.shape == (1, 1, 16, 16, 16)
    assert patch.sum() == 10 * 16 * 5


def test_patches_spread_over_volumes():
    assert split_counts(7, 3) == [3, 2, 2]
    vols = [np.full((1, 40, 40, 40), i, np.float32) for i in range(3)]
    plan = PatchPlan(roi_size=(32, 32, 32), num_patches=7, foreground_threshold=-1)
    got = [int(p.max()) for p in sample_patches(vols, plan)]
    assert got == [0, 0, 0, 1, 1, 2, 2]


def test_tiles_cover_the_volume_ends():
    starts = tile_starts((100, 96, 50), (96, 96, 96), 0.5)
    assert {s[0] for s in starts} == {0, 4} and {s[1] for s in starts} == {0} and {s[2] for s in starts} == {0}


def test_empty_calibration_set_is_an_error():
    with pytest.raises(CalibrationError, match="empty"):
        list(sample_patches([], PatchPlan(roi_size=(8, 8, 8))))


def test_wrong_volume_rank_and_nan_are_errors():
    with pytest.raises(CalibrationError, match=r"\[C, D, H, W\]"):
        list(sample_patches([np.zeros((8, 8, 8), np.float32)], PatchPlan(roi_size=(8, 8, 8), num_patches=1)))
    bad = np.zeros((1, 8, 8, 8), np.float32)
    bad[0, 1, 1, 1] = np.nan
    with pytest.raises(CalibrationError, match="NaN"):
        list(sample_patches([bad], PatchPlan(roi_size=(8, 8, 8), num_patches=1)))


@pytest.mark.parametrize("kwargs", [{"num_patches": 0}, {"foreground_fraction": 1.5}, {"roi_size": (8, 8)}])
def test_bad_plans_are_rejected(kwargs):
    args = {"roi_size": (8, 8, 8), **kwargs}
    with pytest.raises(CalibrationError):
        PatchPlan(**args)
