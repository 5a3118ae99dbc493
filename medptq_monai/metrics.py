"""Dice scores of label maps: per class, absent classes excluded."""

from __future__ import annotations

import math

import numpy as np


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> dict[int, float]:
    """Dice of each foreground class ``1..num_classes-1`` that is present in ``ref``.

    Classes absent from ``ref`` are left out of the dict (not scored 0); a class present in
    ``ref`` but never predicted scores 0.0.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    p, r = pred.astype(np.intp, copy=False).ravel(), ref.astype(np.intp, copy=False).ravel()
    if p.size and (p.min() < 0 or r.min() < 0):
        raise ValueError("label maps must hold non-negative class indices")
    n = max(int(num_classes), int(p.max(initial=0)) + 1, int(r.max(initial=0)) + 1)
    ref_count, pred_count = np.bincount(r, minlength=n), np.bincount(p, minlength=n)
    inter = np.bincount(r[p == r], minlength=n)
    return {
        c: float(2.0 * inter[c] / (ref_count[c] + pred_count[c])) for c in range(1, int(num_classes)) if ref_count[c]
    }


def mean_dice(per_class: dict[int, float]) -> float | None:
    """Mean of a ``dice_per_class`` result; ``None`` when no class was present."""
    return float(np.mean(list(per_class.values()))) if per_class else None


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref - test)^2))``."""
    ref = np.asarray(reference, np.float64)
    return sqnr_db_from_sums(float(np.sum(ref**2)), float(np.sum((ref - np.asarray(test, np.float64)) ** 2)))


def sqnr_db_from_sums(signal: float, noise: float) -> float:
    """``sqnr_db`` from its two sums (``sum(ref^2)``, ``sum((ref - test)^2)``): SQNR pooled over several arrays."""
    return math.inf if noise == 0 else -math.inf if signal == 0 else 10.0 * math.log10(signal / noise)


def sum_of_squares(x: np.ndarray) -> float:
    """``sum(x^2)`` accumulated in float64 without a float64 copy of ``x`` (a 128³ logit tensor is hundreds of
    MB)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))
