"""A bundle's validation set for accuracy-aware PTQ (``medptq quantize --max_dice_drop X``).

The validation data come the way calibration data do, through the bundle's own ``dataset`` and
``preprocessing``, with their own overrides (``--val_dataset_dir D``, ``--val_datalist [...]``,
``--val_data_list_file_path F``); they must not share a file with the calibration data. The budget is
scored on these whole volumes, segmented by the bundle's own ``inferer`` (so a handful of volumes is
the right size); seeded patches at the model's roi cut from them rank the layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..calibrate.accuracy_control import AccuracyControl, ValidationSet, check_budget, check_evaluation_engine
from ..calibrate.patches import PatchPlan, sample_patches
from ..errors import BundleConfigError, CalibrationError
from .bundle_config import BundleConfig, dataset_images, read_bundle

#: CLI/keyword prefix of the validation set's config overrides (``val_dataset_dir`` -> ``dataset_dir``)
PREFIX = "val_"
LABEL_KEY = "label"


def split_validation(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(calibration overrides, validation overrides with the ``val_`` prefix removed)."""
    calibration = {k: v for k, v in overrides.items() if not k.startswith(PREFIX)}
    validation = {k[len(PREFIX):]: v for k, v in overrides.items() if k.startswith(PREFIX)}
    return calibration, validation


def check_request(max_dice_drop: float | None, metric: str, validation: Mapping[str, Any],
                  engine: str = "auto") -> None:
    """Refuse a bad budget, metric or engine, a budget without a validation set and a validation set without
    budget."""
    if max_dice_drop is None:
        if validation:
            raise CalibrationError(f"validation data ({', '.join(PREFIX + k for k in validation)}) were given "
                                   "without --max_dice_drop")
        return
    check_budget(max_dice_drop, metric)
    check_evaluation_engine(engine)
    if not validation:
        raise CalibrationError("--max_dice_drop needs a validation set disjoint from the calibration data: "
                               "--val_dataset_dir D, --val_datalist [...] or --val_data_list_file_path F")


def _files(item: Any) -> Iterator[str]:
    if isinstance(item, Mapping):
        for value in item.values():
            yield from _files(value)
    elif isinstance(item, (list, tuple)):
        for value in item:
            yield from _files(value)
    elif isinstance(item, (str, os.PathLike)) and os.path.exists(item):
        yield os.path.realpath(item)


def _dataset_files(dataset: Any, what: str) -> set[str]:
    data = getattr(dataset, "data", None)
    if data is None:
        raise BundleConfigError(f"the {what} `dataset` has no `data` list: its files cannot be checked to be "
                                "disjoint from the other set")
    return {f for item in data for f in _files(item)}


def validation_control(
    bundle: BundleConfig, calibration_dataset: Any, overrides: Mapping[str, Any], validation: Mapping[str, Any],
    max_dice_drop: float, metric: str, num_patches: int, seed: int, roi: Sequence[int], in_channels: int,
    num_classes: int, image_key: str, max_float_fraction: float, engine: str = "auto",
) -> AccuracyControl:
    """The bundle's validation set (``read_validation_set``) and the budget as an ``AccuracyControl``."""
    checked = read_validation_set(bundle, calibration_dataset, overrides, validation, metric == "dice_vs_labels",
                                  num_patches, seed, roi, in_channels, image_key)
    return AccuracyControl(float(max_dice_drop), checked, num_classes, metric, float(max_float_fraction), engine)


def read_validation_set(
    bundle: BundleConfig, calibration_dataset: Any, overrides: Mapping[str, Any], validation: Mapping[str, Any],
    with_labels: bool, num_patches: int, seed: int, roi: Sequence[int], in_channels: int, image_key: str,
) -> ValidationSet:
    """The bundle's ``dataset`` with the ``validation`` overrides, checked disjoint from ``calibration_dataset``:
    its preprocessed volumes (and labels when ``with_labels``), ``num_patches`` seeded patches at ``roi`` and
    the bundle's inferer."""
    if int(num_patches) < 1:
        raise CalibrationError(f"validation_patches must be >= 1, got {num_patches}")
    checked = read_bundle(bundle.root, bundle.config_files, bundle.meta_file, **{**overrides, **validation})
    dataset = checked.parsed("dataset", "the validation data, through the bundle's own preprocessing")
    if len(dataset) == 0:
        raise CalibrationError(f"the validation set ({', '.join(f'{PREFIX}{k}' for k in validation)}) is empty")
    shared = _dataset_files(calibration_dataset, "calibration") & _dataset_files(dataset, "validation")
    if shared:
        raise CalibrationError(f"the validation set shares {len(shared)} file(s) with the calibration data (e.g. "
                               f"{sorted(shared)[0]}): give disjoint data")
    stacked = list(_stacked(dataset, image_key, in_channels, checked, with_labels))
    volumes = [v[:-1] if with_labels else v for v in stacked]
    labels = [np.rint(v[-1]).astype(np.int64) for v in stacked] if with_labels else None
    plan = PatchPlan(roi_size=tuple(int(r) for r in roi), num_patches=int(num_patches), seed=int(seed) + 1009)
    patches = [np.ascontiguousarray(p, np.float32) for p in sample_patches(volumes, plan, num_volumes=len(volumes))]
    inferer = checked.parsed("inferer", "segments the validation volumes as the bundle does")
    if hasattr(inferer, "progress"):
        inferer.progress = False
    return ValidationSet(patches, labels, volumes, inferer)


def _stacked(dataset: Any, image_key: str, in_channels: int, bundle: BundleConfig,
             with_labels: bool) -> Iterator[np.ndarray]:
    """Each preprocessed validation image ``[C, D, H, W]``, with its label as one more channel when asked."""
    what = "the validation `dataset`"
    for index, (item, image) in enumerate(dataset_images(dataset, image_key, in_channels, bundle, what)):
        image = np.asarray(image, np.float32)
        if not with_labels:
            yield image
            continue
        if not isinstance(item, Mapping) or LABEL_KEY not in item:
            raise CalibrationError(f"metric dice_vs_labels: {what} item {index} has no {LABEL_KEY!r} after "
                                   "`preprocessing` (give a datalist with 'label' entries)")
        label = np.asarray(item[LABEL_KEY], np.float32)
        if label.shape[-3:] != image.shape[-3:]:
            raise CalibrationError(f"{what} item {index}: label shape {label.shape} does not match the image "
                                   f"{image.shape} after `preprocessing`")
        yield np.concatenate([image, label.reshape(1, *label.shape[-3:])])


def metadata_with_accuracy(meta_file: Path, summary: Mapping[str, Any]) -> str:
    """The bundle metadata's text with ``quantization.accuracy_control`` set to ``summary``."""
    meta = json.loads(Path(meta_file).read_text(encoding="utf-8"))
    quantization = meta.setdefault("quantization", {})
    if not isinstance(quantization, dict):
        raise BundleConfigError(f"{meta_file}: `quantization` must be an object")
    quantization["accuracy_control"] = dict(summary)
    return json.dumps(meta, indent=4) + "\n"
