"""Seeded calibration patches: sliding-window tiles and foreground-centred crops.

Patches are cut from volumes that already went through the bundle's own preprocessing,
so calibration sees exactly what inference sees. Nothing is random except through the
seeded generator: same seed + same volumes → the same patches, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CalibrationError


@dataclass(frozen=True)
class PatchPlan:
    """How many patches to draw and how: ``foreground_fraction`` of them centred on foreground voxels
    (intensity > ``foreground_threshold``), the rest chosen among the sliding-window tiles."""

    roi_size: tuple[int, ...]
    num_patches: int = 32
    seed: int = 0
    foreground_fraction: float = 0.5
    foreground_threshold: float = 0.0
    overlap: float = 0.5

    def __post_init__(self) -> None:
        if self.num_patches < 1:
            raise CalibrationError(f"num_patches must be >= 1, got {self.num_patches}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise CalibrationError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise CalibrationError(f"roi_size must be 3 positive ints, got {self.roi_size}")


def _pad_to_roi(vol: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """Pad [C, D, H, W] symmetrically with zeros up to ``roi`` (as MONAI's sliding window does)."""
    pads = [(0, 0)]
    for size, want in zip(vol.shape[1:], roi, strict=True):
        extra = max(want - size, 0)
        pads.append((extra // 2, extra - extra // 2))
    return np.pad(vol, pads) if any(p != (0, 0) for p in pads) else vol


def tile_starts(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Start corners of the sliding-window tiles covering ``shape`` (last tile flush with the end)."""
    axes = []
    for size, r in zip(shape, roi, strict=True):
        step = max(int(r * (1.0 - overlap)), 1)
        starts = list(range(0, max(size - r, 0) + 1, step))
        if starts[-1] != max(size - r, 0):
            starts.append(max(size - r, 0))
        axes.append(starts)
    return [tuple(int(v) for v in idx) for idx in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)]


def _foreground_starts(vol: np.ndarray, roi: Sequence[int], threshold: float, count: int, rng: np.random.Generator):
    mask = (vol > threshold).any(axis=0)
    coords = np.argwhere(mask)
    if len(coords) == 0:
        return []
    picks = coords[rng.integers(0, len(coords), size=count)]
    starts = []
    for centre in picks:
        starts.append(
            tuple(
                int(np.clip(c - r // 2, 0, s - r)) for c, r, s in zip(centre, roi, vol.shape[1:], strict=True)
            )
        )
    return starts


def split_counts(total: int, parts: int) -> list[int]:
    """Split ``total`` patches as evenly as possible over ``parts`` volumes (earlier ones get the extra)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def patches_from_volume(vol: np.ndarray | torch.Tensor, count: int, plan: PatchPlan, rng: np.random.Generator):
    """Yield ``count`` patches ``[1, C, *roi]`` (float32) from one preprocessed volume ``[C, D, H, W]``."""
    vol = np.asarray(torch.as_tensor(vol).detach().cpu(), dtype=np.float32)
    if vol.ndim != 4:
        raise CalibrationError(f"calibration volumes must be [C, D, H, W], got shape {vol.shape}")
    if not np.isfinite(vol).all():
        raise CalibrationError("calibration volume holds NaN/Inf values")
    roi = plan.roi_size
    vol = _pad_to_roi(vol, roi)
    n_fg = int(round(count * plan.foreground_fraction))
    starts = _foreground_starts(vol, roi, plan.foreground_threshold, n_fg, rng)
    tiles = tile_starts(vol.shape[1:], roi, plan.overlap)
    n_tiles = count - len(starts)
    order = rng.permutation(len(tiles))
    starts += [tiles[order[i % len(tiles)]] for i in range(n_tiles)]
    for s in starts:
        sl = tuple(slice(a, a + r) for a, r in zip(s, roi, strict=True))
        yield np.ascontiguousarray(vol[(slice(None), *sl)][None])


def sample_patches(volumes: Sequence | Iterable, plan: PatchPlan, num_volumes: int | None = None) -> Iterator[np.ndarray]:
    """Yield ``plan.num_patches`` seeded patches spread evenly over ``volumes``.

    With fewer patches than volumes, the first ``num_patches`` volumes give one patch each.

    ``volumes`` yields preprocessed ``[C, D, H, W]`` arrays (e.g. a MONAI ``Dataset`` of dicts is
    handled by the caller); it is read one volume at a time, so memory does not grow with the
    number of volumes or patches. ``num_volumes`` is needed when ``volumes`` has no ``len``.
    """
    if num_volumes is None:
        try:
            num_volumes = len(volumes)  # type: ignore[arg-type]
        except TypeError as err:
            raise CalibrationError("pass num_volumes for a calibration source without len()") from err
    if num_volumes < 1:
        raise CalibrationError("no calibration data: the calibration dataset is empty")
    counts = [c for c in split_counts(plan.num_patches, num_volumes) if c]
    rng = np.random.default_rng(plan.seed)
    source = iter(volumes)
    for index, count in enumerate(counts):
        try:
            vol = next(source)
        except StopIteration:
            raise CalibrationError(f"calibration source yielded {index} volume(s), expected {num_volumes}") from None
        yield from patches_from_volume(vol, count, plan, rng)
