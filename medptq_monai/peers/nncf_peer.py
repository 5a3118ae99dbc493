"""NNCF (OpenVINO backend) quantizing the same FP32 ONNX as medptq, so the two INT8 models can be compared.

NNCF is an optional extra (``pip install 'medptq-monai[peer]'``). The result is an OpenVINO IR (``.xml`` +
``.bin``, weights kept in FP32 storage) that ``OpenVinoEngine`` runs like an ONNX file.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError, EngineUnavailableError, ModelFileError
from ..export.onnx_model import IOSpec, io_spec, load_onnx
from ..metrics import dice_per_class, mean_dice

IR_STEM = "model_nncf_int8"
INSTALL_HINT = "pip install 'medptq-monai[peer]'"
QUANTIZED_OP_TYPES = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")


def nncf_version() -> str | None:
    """The installed NNCF version, ``None`` when NNCF is not installed."""
    try:
        import nncf
    except ImportError:
        return None
    return str(nncf.__version__)


def _nncf() -> Any:
    try:
        import nncf
    except ImportError as err:
        raise EngineUnavailableError(f"NNCF is not installed: {INSTALL_HINT}") from err
    return nncf


def openvino_ir_bytes(xml: str | os.PathLike) -> int:
    """Size on disk of an OpenVINO IR: ``.xml`` + ``.bin``."""
    xml = Path(xml)
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def _checked_patches(spec: IOSpec, patches: Sequence[np.ndarray], what: str,
                     any_spatial: bool = False) -> list[np.ndarray]:
    """``patches`` as float32 arrays ``[N, C, D, H, W]`` matching the model input (``any_spatial``: all of one
    spatial size, not necessarily the model's); ``CalibrationError`` otherwise."""
    if patches is None or len(patches) == 0:
        raise CalibrationError(f"no {what} patches given")
    out, spatial = [], None
    for i, patch in enumerate(patches):
        if not isinstance(patch, np.ndarray) or not np.issubdtype(patch.dtype, np.floating):
            raise CalibrationError(f"{what} patch {i}: expected a float numpy array, got "
                                   f"{type(patch).__name__} {getattr(patch, 'dtype', '')}")
        if patch.ndim != len(spec.input_shape) or patch.ndim != 5:
            raise CalibrationError(f"{what} patch {i}: expected [N, C, D, H, W] for a model input "
                                   f"{spec.input_shape}, got shape {patch.shape}")
        fixed = spec.input_shape[:2] if any_spatial else spec.input_shape
        bad = [(w, g) for w, g in zip(fixed, patch.shape) if w is not None and w != g]
        if bad or (any_spatial and spatial is not None and patch.shape[2:] != spatial):
            raise CalibrationError(f"{what} patch {i} has shape {patch.shape}; the model input is "
                                   f"{spec.input_shape}" + (" (one spatial size for all)" if any_spatial else ""))
        if not np.isfinite(patch).all():
            raise CalibrationError(f"{what} patch {i} holds NaN/Inf values")
        spatial = patch.shape[2:]
        out.append(np.ascontiguousarray(patch, dtype=np.float32))
    return out


def _read_model(fp32_onnx: Path, spec: IOSpec, spatial: Sequence[int] | None) -> tuple[Any, Any]:
    """The FP32 ONNX as an ``ov.Model`` (reshaped to ``spatial`` when given) and its original input shape."""
    import openvino as ov

    try:
        model = ov.Core().read_model(str(fp32_onnx))
    except Exception as err:
        raise ModelFileError(f"OpenVINO cannot read {fp32_onnx}: {err}") from err
    _stable_names(model)  # before NNCF, whose new ops are named after the ones they quantize
    original = model.input(0).get_partial_shape()
    if spatial is not None and tuple(spatial) != tuple(spec.spatial_shape):
        shape = [original[0], original[1], *[int(s) for s in spatial]]
        model.reshape({model.input(0).get_any_name(): ov.PartialShape(shape)})
    return model, original


def _restore_shape(model: Any, original: Any) -> Any:
    import openvino as ov

    if model.input(0).get_partial_shape() != original:
        model.reshape({model.input(0).get_any_name(): ov.PartialShape(original)})
    return model


def _stable_names(model: Any) -> Any:
    """Rename OpenVINO's auto-named ops (``Constant_7798``: a process-wide counter) by their position in the graph,
    so the same inputs give the same IR bytes in any process. Only labels change."""
    for index, op in enumerate(model.get_ordered_ops()):
        kind = op.get_type_name()
        if re.fullmatch(rf"{re.escape(kind)}_\d+", op.get_friendly_name()):
            op.set_friendly_name(f"{kind}_n{index}")
    return model


def _save_ir(model: Any, out_dir: str | os.PathLike, stem: str) -> Path:
    """Write ``<stem>.xml`` + ``.bin`` in a scratch folder inside ``out_dir``, then move both into place."""
    import openvino as ov

    _stable_names(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nncf-", dir=out) as tmp:
        xml = Path(tmp) / f"{stem}.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        os.replace(xml.with_suffix(".bin"), out / f"{stem}.bin")
        os.replace(xml, out / f"{stem}.xml")
    return out / f"{stem}.xml"


def _prepare(fp32_onnx: str | os.PathLike, calibration: Sequence[np.ndarray], subset_size: int | None, seed: int,
             any_spatial: bool) -> tuple[IOSpec, list[np.ndarray]]:
    """Check the model and the patches; the ``subset_size`` patches NNCF gets (seeded choice, in order)."""
    spec = io_spec(load_onnx(fp32_onnx, load_weights=False))
    patches = _checked_patches(spec, calibration, "calibration", any_spatial)
    count = len(patches) if subset_size is None else int(subset_size)
    if not 1 <= count <= len(patches):
        raise CalibrationError(f"subset_size must be between 1 and the {len(patches)} patches given, got {subset_size}")
    if count < len(patches):
        keep = np.sort(np.random.default_rng(seed).choice(len(patches), size=count, replace=False))
        patches = [patches[i] for i in keep]
    random.seed(seed)
    np.random.seed(seed)  # NNCF draws from the global generators where it draws at all
    return spec, patches


def nncf_quantize(fp32_onnx: str | os.PathLike, calibration: Sequence[np.ndarray], out_dir: str | os.PathLike, *,
                  subset_size: int | None = None, seed: int = 0, calibrate_at_patch_size: bool = False,
                  stem: str = IR_STEM) -> Path:
    """NNCF's post-training INT8 of ``fp32_onnx`` on OpenVINO; returns ``out_dir/<stem>.xml`` (IR, FP32 weights).

    NNCF defaults throughout: ``preset`` None (NNCF then picks PERFORMANCE: symmetric weights and activations,
    since no ``model_type`` is given), ``target_device`` ANY, ``fast_bias_correction`` True, no ignored scope,
    default advanced parameters (NNCF's own range estimators and overflow fix). Only
    ``subset_size`` is set: all ``calibration`` patches (or a seeded choice of ``subset_size`` of them).
    ``calibrate_at_patch_size``: the patches may have another spatial size than the model (medptq's
    ``calibration_roi``); the model is reshaped to it for calibration and saved back at its own input shape.
    Bad patches raise ``CalibrationError`` and an unreadable model ``ModelFileError``, before anything is written.
    """
    nncf = _nncf()
    spec, patches = _prepare(fp32_onnx, calibration, subset_size, seed, calibrate_at_patch_size)
    model, original = _read_model(Path(fp32_onnx), spec, patches[0].shape[2:] if calibrate_at_patch_size else None)
    quantized = nncf.quantize(model, nncf.Dataset(patches), subset_size=len(patches))
    return _save_ir(_restore_shape(quantized, original), out_dir, stem)


def _outputs(compiled: Any, patch: np.ndarray) -> np.ndarray:
    return np.asarray(compiled(patch)[compiled.output(0)])


def _patch_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    """Class-mean foreground Dice of ``pred`` vs ``ref``; a patch where ``ref`` has no foreground scores 1.0 when
    ``pred`` has none either, else 0.0 (all of it is false positive)."""
    score = mean_dice(dice_per_class(pred, ref, num_classes))
    return score if score is not None else float(not np.any(pred > 0))


def dice_vs_fp32_fn(num_classes: int) -> Any:
    """NNCF validation function: pooled class-mean foreground Dice of the model's argmax against the FP32 argmax
    carried in each item ``(fp32_argmax, patch)`` (so FP32 scores 1.0), as medptq's ``dice_vs_fp32``; the
    per-patch Dice goes back too, for NNCF's ranking."""
    def validate(compiled: Any, items: Any) -> tuple[float, list[float]]:
        preds, refs, per_item = [], [], []
        for ref, patch in items:
            pred = _outputs(compiled, patch).argmax(axis=1)
            preds.append(pred)
            refs.append(ref)
            per_item.append(_patch_dice(pred, ref, num_classes))
        pooled = mean_dice(dice_per_class(np.concatenate(preds), np.concatenate(refs), num_classes))
        return (pooled if pooled is not None else float(np.mean(per_item))), per_item

    return validate


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class AccuracyControlOutcome:
    """What ``nncf_quantize_with_accuracy_control`` produced and what NNCF reported."""

    ir: Path
    seconds: float
    max_dice_drop: float
    dice_vs_fp32: float  # pooled Dice of the saved IR's argmax vs FP32 on the validation patches
    int8_ops: int  # convolutions / MatMuls in the IR with a FakeQuantize on their data input
    weighted_ops: int  # all convolutions / MatMuls in the IR
    reverted_ops: int | None  # NNCF's own count of operations returned to float (None: it did not say)
    nncf_quantized_ops: int | None  # NNCF's count of quantized operations before reverting
    nncf_log: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"ir": str(self.ir), "seconds": round(self.seconds, 2), "max_dice_drop": self.max_dice_drop,
                "dice_vs_fp32": round(self.dice_vs_fp32, 5), "dice_drop": round(1.0 - self.dice_vs_fp32, 5),
                "int8_ops": self.int8_ops, "weighted_ops": self.weighted_ops, "reverted_ops": self.reverted_ops,
                "nncf_quantized_ops": self.nncf_quantized_ops}


PASS_THROUGH = ("Convert", "Reshape", "Transpose", "Concat")


def _fed_by_fake_quantize(node: Any) -> bool:
    """True when ``node`` is a FakeQuantize, or only moves / joins FakeQuantize outputs (Concat of quantized inputs)."""
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind not in PASS_THROUGH or not node.get_input_size():
        return False
    data = [node.input_value(0)] if kind != "Concat" else list(node.input_values())
    return all(_fed_by_fake_quantize(v.get_node()) for v in data)


def count_int8_ops(model: Any) -> tuple[int, int]:
    """(ops whose data input comes from FakeQuantize, all ops) over ``QUANTIZED_OP_TYPES`` in an ``ov.Model``."""
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() in QUANTIZED_OP_TYPES]
    return sum(_fed_by_fake_quantize(op.input_value(0).get_node()) for op in ops), len(ops)


def _reported(lines: Sequence[str]) -> tuple[int | None, int | None]:
    """NNCF's reverted and quantized operation counts, from its accuracy-control report lines."""
    reverted = total = None
    for line in lines:
        if (m := re.search(r"Total number of quantized operations in the model: (\d+)", line)):
            total = int(m.group(1))
        if (m := re.search(r"(\d+) out of (\d+) were reverted", line)):
            reverted, total = int(m.group(1)), int(m.group(2))
    if reverted is None and total is not None:
        reverted = 0
    return reverted, total


def nncf_quantize_with_accuracy_control(
    fp32_onnx: str | os.PathLike, calibration: Sequence[np.ndarray], validation: Sequence[np.ndarray],
    max_dice_drop: float, num_classes: int, out_dir: str | os.PathLike, *, subset_size: int | None = None,
    seed: int = 0, stem: str = "model_nncf_int8_ac",
) -> AccuracyControlOutcome:
    """NNCF's ``quantize_with_accuracy_control`` (OpenVINO backend, NNCF defaults as in ``nncf_quantize``) with
    ``max_drop=max_dice_drop``, ``drop_type=ABSOLUTE`` and the metric ``dice_vs_fp32_fn`` on ``validation``
    patches (their FP32 argmax is computed first, in f32). The validation patches must hold FP32 foreground
    (``CalibrationError`` otherwise); nothing is written unless NNCF succeeds."""
    nncf = _nncf()
    import openvino as ov

    if isinstance(max_dice_drop, bool) or not 0.0 < float(max_dice_drop) < 1.0:
        raise CalibrationError(f"max_dice_drop must be strictly between 0 and 1, got {max_dice_drop!r}")
    spec, patches = _prepare(fp32_onnx, calibration, subset_size, seed, False)
    held = _checked_patches(spec, validation, "validation")
    model, _original = _read_model(Path(fp32_onnx), spec, None)
    fp32 = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    refs = [_outputs(fp32, p).argmax(axis=1) for p in held]
    del fp32
    if not any(np.any(r > 0) for r in refs):
        raise CalibrationError("the FP32 model predicts no foreground on the validation patches: Dice vs FP32 "
                               "cannot rank anything; choose patches with anatomy")
    items = list(zip(refs, held, strict=True))
    collect, logger = _Collect(), logging.getLogger("nncf")
    logger.addHandler(collect)
    start = time.perf_counter()
    try:
        result = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(patches), nncf.Dataset(items, lambda item: item[1]), dice_vs_fp32_fn(num_classes),
            max_drop=float(max_dice_drop), drop_type=nncf.DropType.ABSOLUTE, subset_size=len(patches))
    finally:
        logger.removeHandler(collect)
    seconds = time.perf_counter() - start
    compiled = ov.Core().compile_model(result, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    dice, _per_item = dice_vs_fp32_fn(num_classes)(compiled, items)
    del compiled
    int8_ops, weighted_ops = count_int8_ops(result)
    reverted, total = _reported(collect.lines)
    ir = _save_ir(result, out_dir, stem)
    return AccuracyControlOutcome(ir, seconds, float(max_dice_drop), float(dice), int8_ops, weighted_ops, reverted,
                                  total, collect.lines)
