"""``medptq quantize BUNDLE``: INT8 for an unmodified MONAI bundle (model-zoo layout).

Reads the bundle's own ids (``network_def``, ``dataset`` with its ``preprocessing``, ``inferer``,
``_meta_`` ``network_data_format``) and its checkpoint; exports FP32 ONNX, calibrates on seeded
patches of the bundle's own preprocessed data, checks the INT8 model against FP32 on held-back
patches through the overlay's own network, and only then writes ``models/model.onnx``,
``models/model_int8.onnx`` and ``configs/inference_int8.json``. Any failure leaves the bundle as it
was: the three files are built in a scratch folder and moved into place together at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..calibrate.accuracy_control import METRICS, ValidationSet
from ..calibrate.calibrators import DEFAULT_CALIBRATOR
from ..calibrate.ort_outputs import DEFAULT_BUDGET_DB, SUMMARY_KEY
from ..calibrate.patches import PatchPlan, sample_patches
from ..calibrate.quantize import QuantizeOptions, quantize_onnx
from ..engines import first_cpu_engine
from ..errors import BundleConfigError, CalibrationError, MedPTQError, ModelFileError, UnknownNameError
from ..export.onnx_model import io_spec, load_onnx
from ..export.torch_export import export_fp32
from ..fileio import sha256_file, write_text_atomic
from ..machine import PeakRSS
from ..metrics import sqnr_db
from .accuracy import check_request, metadata_with_accuracy, read_validation_set, split_validation, validation_control
from .bundle_config import BundleConfig, dataset_images, importable_scripts, inferer_roi, meta_channels, read_bundle
from .overlay import (
    DIGEST_KEY, FP32_NAME, INT8_NAME, OVERLAY_IDS, OVERLAY_NAME, overlay_text, render_overlay, state_digest, unwrap_state,
)

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "model.pt"


def quantize_bundle(
    bundle_dir: str | os.PathLike,
    config_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    meta_file: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    roi_size: Sequence[int] | None = None,
    calibrator: str | None = None,
    num_patches: int | None = None,
    seed: int | None = None,
    exclude: Sequence[str] | str | None = None,
    heldout_patches: int = 4,
    progress: bool = True,
    calibration_roi: Sequence[int] | None = None,
    max_dice_drop: float | None = None,
    metric: str = "dice_vs_fp32",
    validation_patches: int = 8,
    max_float_fraction: float = 0.5,
    accuracy_engine: str = "auto",
    ort_output_budget_db: float | None = None,
    **overrides: Any,
) -> dict:
    """Quantize the bundle at ``bundle_dir`` to INT8 and write its overlay; returns a summary.

    ``config_file``: the bundle's inference config(s), default ``configs/inference.json`` (or .yaml);
    a list is merged in order, as ``monai.bundle run`` does. ``overrides`` replace config ids before
    anything is built (``dataset_dir=...``, ``datalist=...``, ``data_list_file_path=...``).
    ``checkpoint`` defaults to ``model.pt`` in the bundle's ``models_dir`` (``models/`` when it has none), where
    the ONNX files are written; ``roi_size`` defaults to ``inferer#roi_size``.
    ``exclude``: ``fnmatch`` patterns over ONNX node names kept in float (a list, or comma-separated).
    ``calibration_roi``: calibrate a second export at this smaller patch size and apply its ranges (memory).
    ``calibrator``, ``num_patches``, ``seed``, ``exclude`` and ``calibration_roi`` default to the bundle's
    metadata ``quantization`` section (see ``bundle_quantization``), else to medptq's defaults.
    ``heldout_patches`` extra patches are drawn with the same seed but kept out of calibration: the
    summary's SQNR (INT8 vs FP32 logits, dB) is measured on them.
    ``max_dice_drop``: accuracy-aware PTQ (``calibrate/accuracy_control.py``): the most harmful layers go back
    to float until the Dice drop (``metric`` ``dice_vs_fp32`` or ``dice_vs_labels``) on ``validation_patches``
    seeded patches of a validation set meets it. The validation set is the bundle's ``dataset`` with the
    ``val_``-prefixed overrides (``val_dataset_dir=...``), disjoint from the calibration data; the metadata's
    hand-picked ``float_layers`` are then not used (unless ``exclude`` is given). The candidates run on the CPU
    engine ``accuracy_engine`` (``auto``: OpenVINO when installed). The choice is recorded in the INT8 file and
    in the bundle metadata's ``quantization.accuracy_control``.
    ``ort_output_budget_db``: the SQNR ONNX Runtime's output quantizers may cost (``calibrate/ort_outputs.py``;
    0: none), default the metadata's ``quantization.ort_output_budget_db``, else ``ort_outputs.DEFAULT_BUDGET_DB``.
    """
    start = time.perf_counter()
    if int(heldout_patches) < 0:
        raise CalibrationError(f"heldout_patches must be >= 0, got {heldout_patches}")
    overrides, validation = split_validation(overrides)
    check_request(max_dice_drop, metric, validation, accuracy_engine)
    if max_dice_drop is not None and exclude is None:
        exclude = ()  # accuracy control chooses the float layers
    with PeakRSS() as memory:
        bundle = read_bundle(bundle_dir, config_file, meta_file, **overrides)
        settings = bundle_quantization(bundle, calibrator=calibrator, num_patches=num_patches, seed=seed,
                                       exclude=exclude, calibration_roi=calibration_roi,
                                       ort_output_budget_db=ort_output_budget_db)
        if max_dice_drop is not None:
            settings.accuracy = {"max_dice_drop": max_dice_drop, "metric": metric, "validation": validation,
                                 "num_patches": validation_patches, "max_float_fraction": max_float_fraction,
                                 "engine": accuracy_engine}
        with importable_scripts(bundle.root):
            summary = _quantize(bundle, checkpoint, roi_size, settings, int(heldout_patches), progress, overrides)
    summary["bundle"] = os.fspath(bundle_dir)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["peak_rss_bytes"] = int(memory.peak)
    logger.info("quantized %s: %s", bundle.root, summary)
    return summary


@dataclass
class Settings:
    """How a bundle is quantized: the options, the patch count and the calibration patch size cap."""

    options: QuantizeOptions
    num_patches: int
    max_calibration_roi: int | None = None
    calibration_roi: tuple[int, ...] | None = None
    accuracy: dict[str, Any] | None = None  # the accuracy-control request (``quantize_bundle`` arguments)


def bundle_quantization(bundle: BundleConfig, calibrator: str | None = None, num_patches: int | None = None,
                        seed: int | None = None, exclude: Sequence[str] | str | None = None,
                        calibration_roi: Sequence[int] | None = None,
                        ort_output_budget_db: float | None = None) -> Settings:
    """Quantization settings: each given argument, else the bundle metadata's ``quantization`` section
    (``calibrator``, ``calibration_patches``, ``seed``, ``float_layers``, ``quantize_attention``,
    ``percentile``, ``calibration_max_roi``, ``ort_output_budget_db``), else medptq's defaults. Bad values raise
    ``CalibrationError``."""
    meta = bundle.parser.get("_meta_::quantization", {}) if bundle.has("_meta_::quantization") else {}
    if not isinstance(meta, Mapping):
        raise BundleConfigError(f"{bundle.meta_file}: `quantization` must be an object, got {type(meta).__name__}")
    if exclude is None:
        exclude = meta.get("float_layers", ())
    patterns = str(exclude).split(",") if isinstance(exclude, str) else [str(p) for p in exclude]
    count = meta.get("calibration_patches", 32) if num_patches is None else num_patches
    try:
        count, seed = int(count), int(meta.get("seed", 0) if seed is None else seed)
    except (TypeError, ValueError) as err:
        raise CalibrationError(f"num_patches and seed must be integers, got {count!r} and {seed!r}") from err
    if count < 1:
        raise CalibrationError(f"num_patches must be >= 1, got {count}")
    options = QuantizeOptions(
        calibrator=str(calibrator or meta.get("calibrator", DEFAULT_CALIBRATOR)), seed=seed,
        percentile=float(meta.get("percentile", QuantizeOptions.percentile)),
        exclude=tuple(p for p in patterns if p),
        quantize_activation_matmul=bool(meta.get("quantize_attention", False)),
        ort_output_budget_db=meta.get("ort_output_budget_db", DEFAULT_BUDGET_DB) if ort_output_budget_db is None
        else ort_output_budget_db,
    )
    cap = meta.get("calibration_max_roi")
    roi = tuple(int(r) for r in calibration_roi) if calibration_roi is not None else None
    return Settings(options, count, int(cap) if cap is not None else None, roi)


def models_dir(bundle: BundleConfig) -> Path:
    """Where the bundle's weights and ONNX files live: its ``models_dir`` id when it has one, else ``models/``."""
    if bundle.has("models_dir"):
        value = bundle.parsed("models_dir", "the folder of the bundle's weights")
        if not isinstance(value, (str, os.PathLike)):
            raise BundleConfigError(f"`models_dir` in {bundle.where()} must be a path, got {value!r}")
        return Path(value)
    return bundle.root / "models"


def _calibration_roi(settings: Settings, roi: Sequence[int]) -> tuple[int, ...]:
    """The calibration patch size: the explicit one, else ``roi`` capped at the metadata's maximum; checked."""
    calib = settings.calibration_roi or tuple(int(r) if settings.max_calibration_roi is None
                                              else min(int(r), settings.max_calibration_roi) for r in roi)
    if len(calib) != len(roi) or any(c <= 0 or c > r for c, r in zip(calib, roi)):
        raise CalibrationError(f"calibration_roi {list(calib)} must have one positive size per axis, each at most "
                               f"the roi {list(roi)}")
    return tuple(calib)


def calibration_patches(bundle_dir: str | os.PathLike, config_file: str | os.PathLike | Sequence[str | os.PathLike] | None
                        = None, meta_file: str | os.PathLike | None = None, roi_size: Sequence[int] | None = None,
                        num_patches: int | None = None, seed: int | None = None, heldout_patches: int = 4,
                        calibration_roi: Sequence[int] | None = None, **overrides: Any) -> list[np.ndarray]:
    """The patches ``quantize_bundle`` with the same arguments calibrates on, in its order (held-back ones left out),
    each ``[1, C, *calibration roi]`` float32: for another quantizer fed the same data (``medptq bench``'s NNCF)."""
    overrides, _validation = split_validation(overrides)
    bundle = read_bundle(bundle_dir, config_file, meta_file, **overrides)
    settings = bundle_quantization(bundle, num_patches=num_patches, seed=seed, calibration_roi=calibration_roi)
    with importable_scripts(bundle.root):
        in_channels, _num_classes = meta_channels(bundle)
        roi, _from_inferer = inferer_roi(bundle, roi_size)
        calib_roi = _calibration_roi(settings, roi)
        dataset = bundle.parsed("dataset", "the calibration data, through the bundle's own preprocessing")
        _check_not_empty(dataset, bundle)
        plan, held = _calibration_plan(settings, roi, calib_roi, int(heldout_patches))
        return list(_calibration_split(plan, held, dataset, _image_key(bundle), in_channels, bundle))


def validation_set(bundle_dir: str | os.PathLike, config_file: str | os.PathLike | Sequence[str | os.PathLike] | None
                   = None, meta_file: str | os.PathLike | None = None, roi_size: Sequence[int] | None = None,
                   seed: int | None = None, validation_patches: int = 8, metric: str = "dice_vs_fp32",
                   **overrides: Any) -> tuple[ValidationSet, int]:
    """(the validation set ``quantize_bundle --max_dice_drop`` with the same arguments scores on, the bundle's
    class count): to score another quantizer's model alike. The ``val_`` overrides select it, as there."""
    overrides, validation = split_validation(overrides)
    if metric not in METRICS:
        raise UnknownNameError(f"unknown accuracy metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not validation:
        raise CalibrationError("a validation set is needed: --val_dataset_dir D, --val_datalist [...] or "
                               "--val_data_list_file_path F")
    bundle = read_bundle(bundle_dir, config_file, meta_file, **overrides)
    settings = bundle_quantization(bundle, seed=seed)
    with importable_scripts(bundle.root):
        in_channels, num_classes = meta_channels(bundle)
        roi, _from_inferer = inferer_roi(bundle, roi_size)
        dataset = bundle.parsed("dataset", "the calibration data, through the bundle's own preprocessing")
        checked = read_validation_set(bundle, dataset, overrides, validation, metric == "dice_vs_labels",
                                      validation_patches, settings.options.seed, roi, in_channels, _image_key(bundle))
    return checked, num_classes


def _calibration_plan(settings: Settings, roi: Sequence[int], calib_roi: tuple[int, ...],
                      heldout: int) -> tuple[PatchPlan, int]:
    """The seeded calibration patch plan at ``calib_roi`` and how many of its patches are held back (only when
    ``calib_roi`` is the model's roi; else they are re-sampled at the roi after calibration)."""
    held = heldout if calib_roi == tuple(roi) else 0
    return PatchPlan(roi_size=calib_roi, num_patches=settings.num_patches + held, seed=settings.options.seed), held


def _calibration_split(plan: PatchPlan, held: int, dataset: Any, image_key: str, in_channels: int,
                       bundle: BundleConfig) -> HeldBack:
    """The plan's patches of the preprocessed dataset, the last ``held`` of them held back from calibration."""
    volumes = _volumes(dataset, image_key, in_channels, bundle)
    return HeldBack(sample_patches(volumes, plan, num_volumes=len(dataset)), plan.num_patches, held)


def _quantize(bundle: BundleConfig, checkpoint: str | os.PathLike | None, roi_size: Sequence[int] | None,
              settings: Settings, heldout: int, progress: bool, overrides: Mapping[str, Any]) -> dict:
    bundle.require("network_def", "the network to quantize")
    bundle.require("dataset", "the calibration data, through the bundle's own preprocessing")
    in_channels, num_classes = meta_channels(bundle)
    clashes = [i for i in OVERLAY_IDS if bundle.has(i)]
    if clashes:
        logger.warning("the bundle config already defines %s; configs/%s will override them", clashes, OVERLAY_NAME)
    roi, roi_from_inferer = inferer_roi(bundle, roi_size)
    calib_roi = _calibration_roi(settings, roi)
    models = models_dir(bundle)
    ckpt = Path(checkpoint) if checkpoint is not None else models / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise ModelFileError(f"checkpoint not found: {ckpt} (the bundle's weights; pass --checkpoint FILE)")
    network = bundle.parsed("network_def", "the network to quantize")
    if not isinstance(network, torch.nn.Module):
        raise BundleConfigError(f"`network_def` in {bundle.where()} is a {type(network).__name__}, not a torch module")
    digest = _check_checkpoint(network, ckpt, bundle.parser.get("network_def#_target_", "?"))
    dataset = bundle.parsed("dataset", "the calibration data, through the bundle's own preprocessing")
    _check_not_empty(dataset, bundle)
    image_key = _image_key(bundle)
    options, num_patches = settings.options, settings.num_patches
    same_roi = calib_roi == tuple(roi)
    plan, held = _calibration_plan(settings, roi, calib_roi, heldout)
    accuracy = None
    if settings.accuracy is not None:
        request = settings.accuracy
        accuracy = validation_control(bundle, dataset, overrides, request["validation"], request["max_dice_drop"],
                                      request["metric"], request["num_patches"], options.seed, roi, in_channels,
                                      num_classes, image_key, request["max_float_fraction"], request["engine"])

    scratch_parent = models if models.is_dir() else bundle.root
    with tempfile.TemporaryDirectory(prefix=".quantizing-", dir=scratch_parent) as scratch:
        fp32, int8 = Path(scratch) / FP32_NAME, Path(scratch) / INT8_NAME
        _export(network, fp32, ckpt, in_channels, num_classes, roi, bundle, digest)
        calibration_model = None
        if not same_roi:  # ranges from a smaller export of the same network: calibration memory scales with the patch
            calibration_model = Path(scratch) / "calibration_roi.onnx"
            _export(network, calibration_model, ckpt, in_channels, num_classes, calib_roi, bundle, digest)
        del network  # and the parser's cached instance: the FP32 weights are not kept through calibration
        bundle.parser.ref_resolver.remove_resolved_content("network_def")
        split = _calibration_split(plan, held, dataset, image_key, in_channels, bundle)
        with tqdm(total=num_patches, desc=f"calibrating ({options.calibrator})", unit="patch",
                  disable=not progress) as bar:
            result = quantize_onnx(fp32, int8, split, options, source_sha256=sha256_file(ckpt),
                                   on_patch=lambda _n: bar.update(1), calibration_model=calibration_model,
                                   accuracy=accuracy)
        if calibration_model is not None:
            calibration_model.unlink()
            split.held = []
            if heldout:  # re-sampled at the model's roi (no patch plan of 0 patches: that is refused)
                held_plan = PatchPlan(roi_size=roi, num_patches=heldout, seed=options.seed + 1)
                split.held = list(sample_patches(_volumes(dataset, image_key, in_channels, bundle), held_plan,
                                                 num_volumes=len(dataset)))
        overlay = render_overlay(None if roi_from_inferer else roi, bundle.has("device"), bundle.has("models_dir"))
        sqnr, engine = _heldout_sqnr(bundle, overlay, overrides, fp32, int8, split.held)
        meta_text = None
        if result.accuracy is not None:
            meta_text = metadata_with_accuracy(bundle.meta_file, {
                **result.accuracy.summary(), "validation": {k: str(v) for k, v in settings.accuracy["validation"].items()},
                "validation_patches": len(accuracy.validation.images), "calibrator": options.calibrator,
                "seed": options.seed})
        _commit(bundle.root, models, fp32, int8, overlay)
        if meta_text is not None:
            write_text_atomic(bundle.meta_file, meta_text)
    fp32_final, int8_final = models / FP32_NAME, models / INT8_NAME
    fp32_bytes, int8_bytes = fp32_final.stat().st_size, int8_final.stat().st_size
    return {
        "config_files": [_relative(f, bundle.root) for f in bundle.config_files],
        "checkpoint": _relative(ckpt, bundle.root),
        "fp32_onnx": _relative(fp32_final, bundle.root),
        "int8_onnx": _relative(int8_final, bundle.root),
        "overlay": _relative(bundle.root / "configs" / OVERLAY_NAME, bundle.root),
        "fp32_bytes": fp32_bytes,
        "int8_bytes": int8_bytes,
        "size_ratio": round(fp32_bytes / int8_bytes, 2),
        "in_channels": in_channels,
        "num_classes": num_classes,
        "roi_size": list(roi),
        "calibration_roi": list(calib_roi),
        "calibrator": options.calibrator,
        "num_patches": result.num_patches,
        "seed": options.seed,
        "quantized_layers": len(result.quantized_nodes),
        "float_layers": list(result.excluded_nodes),
        "heldout_patches": len(split.held),
        "sqnr_db": sqnr,
        "sqnr_engine": engine,
        **({"accuracy_control": result.accuracy.summary()} if result.accuracy is not None else {}),
        "ort_output_quantizers": json.loads(result.metadata[SUMMARY_KEY]),
    }


class HeldBack:
    """Iterate ``patches`` (``total`` of them) yielding all but ``count`` evenly spaced ones, which are kept
    in ``held`` (filled as the iteration passes them)."""

    def __init__(self, patches: Iterable[np.ndarray], total: int, count: int) -> None:
        self.patches = patches
        self.indices = {(2 * j + 1) * total // (2 * count) for j in range(count)} if count else set()
        self.held: list[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        for i, patch in enumerate(self.patches):
            if i in self.indices:
                self.held.append(patch)
            else:
                yield patch


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def _check_checkpoint(network: torch.nn.Module, ckpt: Path, target: str) -> str:
    """Check ``ckpt`` holds ``network``'s keys and shapes; return its ``state_digest``."""
    try:
        state = unwrap_state(torch.load(str(ckpt), map_location="cpu", weights_only=True))
    except Exception as err:
        raise ModelFileError(f"corrupt or unsafe checkpoint {ckpt}: {err}") from err
    if not isinstance(state, Mapping):
        raise ModelFileError(f"checkpoint {ckpt} holds a {type(state).__name__}, not a state dict")
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} key(s) missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(shapes)} shape mismatch(es) (e.g. {shapes[:2]})" if shapes else ""]
        raise ModelFileError(f"checkpoint {ckpt} does not match `network_def` ({target}): "
                             + "; ".join(p for p in parts if p))
    return state_digest(state)


def _check_not_empty(dataset: Any, bundle: BundleConfig) -> None:
    try:
        count = len(dataset)
    except TypeError as err:
        raise BundleConfigError(f"`dataset` in {bundle.where()} has no length; calibration needs a map-style "
                                "MONAI Dataset") from err
    if count == 0:
        where = ""
        if bundle.has("dataset_dir"):
            try:
                where = f" (dataset_dir = {bundle.parser.get_parsed_content('dataset_dir')})"
            except Exception:  # an unparsable dataset_dir is reported by the dataset itself
                where = ""
        raise CalibrationError(f"`dataset` is empty: its datalist found no images{where}; pass --dataset_dir DIR, "
                               "--datalist [...] or --data_list_file_path FILE")


def _image_key(bundle: BundleConfig) -> str:
    if bundle.has("image_key"):
        key = bundle.parser.get_parsed_content("image_key")
        if isinstance(key, str):
            return key
    return "image"


def _export(network: torch.nn.Module, dest: Path, ckpt: Path, in_channels: int, num_classes: int,
            roi: Sequence[int], bundle: BundleConfig, digest: str) -> None:
    """FP32 ONNX of ``network`` + ``ckpt`` at ``[N, in_channels, *roi]``; disagreement with the metadata raises."""
    target = bundle.parser.get("network_def#_target_", "?")
    try:
        export_fp32(network, dest, in_channels, roi, checkpoint=ckpt, metadata={DIGEST_KEY: digest})
    except MedPTQError:
        raise
    except Exception as err:
        raise ModelFileError(
            f"`network_def` ({target}) does not run on a [1, {in_channels}, {', '.join(map(str, roi))}] input "
            f"({in_channels} channel(s) from {bundle.meta_file} inputs.image.num_channels, roi from the inferer): "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        ) from err
    io_spec(load_onnx(dest, load_weights=False)).check_bundle(f"`network_def` ({target})", in_channels,
                                                              num_classes, roi)


def _volumes(dataset: Any, image_key: str, in_channels: int, bundle: BundleConfig) -> Iterator[Any]:
    """The bundle's preprocessed images, checked (``dataset_images``)."""
    return (image for _item, image in dataset_images(dataset, image_key, in_channels, bundle))


def _heldout_sqnr(bundle: BundleConfig, overlay: dict, overrides: Mapping[str, Any], fp32: Path, int8: Path,
                  held: list[np.ndarray]) -> tuple[float | None, str]:
    """Build the overlay's ``network`` against the bundle (as ``monai.bundle run`` will) for the scratch FP32 and
    INT8 files, on a CPU engine; SQNR (dB) of the INT8 logits vs FP32 over the held-back patches."""
    engine = first_cpu_engine()
    outputs = []
    for model_file, precision in ((fp32, "fp32"), (int8, "int8")):
        settings = {**overrides, **copy.deepcopy(overlay), "engine_model_file": str(model_file), "precision": precision,
                    "engine": engine, "device": "cpu"}
        check = read_bundle(bundle.root, bundle.config_files, bundle.meta_file, **settings)
        try:
            network = check.parser.get_parsed_content("network")
        except MedPTQError:
            raise
        except Exception as err:
            cause = err.__cause__ if isinstance(err.__cause__, MedPTQError) else None
            if cause is not None:
                raise cause from err
            raise BundleConfigError(f"the INT8 overlay does not build against {bundle.where()}: "
                                    f"{str(err).strip().splitlines()[0]}") from err
        with torch.no_grad():
            outputs.append([network(torch.from_numpy(p)).cpu().numpy() for p in held])
        del network
    if not held:
        return None, engine
    return round(sqnr_db(np.concatenate(outputs[0]), np.concatenate(outputs[1])), 2), engine


def _commit(root: Path, models: Path, fp32: Path, int8: Path, overlay: dict) -> None:
    """Move the scratch models into ``models`` and write the overlay (each step atomic)."""
    models.mkdir(parents=True, exist_ok=True)
    for tmp, name in ((fp32, FP32_NAME), (int8, INT8_NAME)):
        os.chmod(tmp, 0o644)
        os.replace(tmp, models / name)
    (root / "configs").mkdir(exist_ok=True)
    write_text_atomic(root / "configs" / OVERLAY_NAME, overlay_text(overlay))
