"""Calibrate a bundle, segment real CTs in FP32 (torch) and INT8, and compare: the fidelity check.

Shared by the demo (``medptq demo``), the ``medptq fidelity`` command and the bundle tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .bundle.overlay import OVERLAY_NAME
from .bundle.quantize_bundle import quantize_bundle
from .bundle.runner import bundle_parser, run_inference
from .bundle.transforms import label_path, load_remapped_label
from .errors import MedPTQError
from .metrics import dice_per_class, mean_dice

NIFTI = (".nii", ".nii.gz")


def _seg(out_dir: Path, image: Path) -> np.ndarray:
    return np.asarray(nib.load(str(label_path(out_dir, image))).dataobj)


def check_fidelity(
    bundle: str | Path,
    data_dir: str | Path = "tests/data/totalseg_ct",
    out_dir: str | Path = "reports/fidelity",
    engine: str = "auto",
    overlays: Sequence[str] = (),
    calib_patches: int | None = None,
    log=print,
) -> dict:
    """Quantize ``bundle`` (``medptq quantize``, with config ``overlays`` such as ``small.json``) on
    ``<data_dir>/calibration`` (another patient; ``images`` when absent), segment ``<data_dir>/images`` with the
    bundle's own FP32 ``inference.json`` (torch) and with the INT8 overlay added, and return Dice vs labels
    for both, Dice(INT8 vs FP32), sizes and timings."""
    root, data, out = Path(bundle).resolve(), Path(data_dir).resolve(), Path(out_dir).resolve()
    images, labels = data / "images", data / "labels"
    if not images.is_dir() or not labels.is_dir():
        raise MedPTQError(f"fidelity data needs {images} and {labels}")
    calib_dir = data / "calibration" if (data / "calibration").is_dir() else images
    configs = ["inference.json", *overlays]
    parser = bundle_parser(root, configs)
    checkpoint = Path(parser.get_parsed_content("checkpoint"))
    if not checkpoint.is_file():
        raise MedPTQError(f"checkpoint missing: {checkpoint}")

    log(f"[1/4] medptq quantize {root.name} {' '.join(overlays)} on {calib_dir}")
    summary = quantize_bundle(root, [root / "configs" / c for c in configs], num_patches=calib_patches,
                              progress=False, dataset_dir=str(calib_dir))
    log("[2/4] FP32 whole-volume inference (the bundle's inference.json: MONAI sliding window, torch eager)")
    fp32_dir, int8_dir = out / "fp32", out / "int8"
    fp32 = run_inference(root, configs, warmup=True, dataset_dir=str(images), output_dir=str(fp32_dir),
                         **{"inferer#progress": False})
    log(f"[3/4] INT8 whole-volume inference (+ {OVERLAY_NAME}, engine={engine})")
    int8 = run_inference(root, [*configs, OVERLAY_NAME], warmup=True, dataset_dir=str(images),
                         output_dir=str(int8_dir), engine=engine, precision="int8", **{"inferer#progress": False})

    log("[4/4] Dice")
    label_map = parser.get_parsed_content("label_map")
    num_classes = int(parser.get_parsed_content("num_classes"))
    names = parser.get_parsed_content("_meta_")["network_data_format"]["outputs"]["pred"]["channel_def"]
    per_f32, per_i8, agree = [], [], []
    per_organ: dict[str, tuple[float, float]] = {}
    for image in sorted(p for p in images.iterdir() if p.name.endswith(NIFTI)):
        ref = load_remapped_label(labels / image.name, label_map)
        seg32, seg8 = _seg(fp32_dir, image), _seg(int8_dir, image)
        d32, d8 = dice_per_class(seg32, ref, num_classes), dice_per_class(seg8, ref, num_classes)
        if not d32:
            raise MedPTQError(f"{labels / image.name}: no organ of the bundle's classes in the labels")
        per_f32.append(mean_dice(d32))
        per_i8.append(mean_dice(d8))
        agree.append(mean_dice(dice_per_class(seg8, seg32, num_classes)) or 0.0)
        for cls in d32:
            per_organ[f"{names.get(str(cls), cls)} ({image.name})"] = (d32[cls], d8.get(cls, 0.0))
    result = {
        "bundle": root.name,
        "overlays": list(overlays),
        "engine": f"{int8['engine']['engine']} ({int8['engine']['precision']}, {int8['engine']['device']})",
        "int8_isa": int8["engine"].get("isa"),  # the INT8 path the engine took (cpu_isa), None for TensorRT
        "int8_model": int8["engine"].get("int8_model"),
        "onnx_fp32_bytes": summary["fp32_bytes"],
        "onnx_int8_bytes": summary["int8_bytes"],
        "size_ratio": summary["fp32_bytes"] / summary["int8_bytes"],
        "calibrator": summary["calibrator"],
        "calibration_patches": summary["num_patches"],
        "excluded_nodes": summary["float_layers"],
        "heldout_sqnr_db": summary["sqnr_db"],
        "calibration_data": str(calib_dir),
        "dice_fp32": float(np.mean(per_f32)),
        "dice_int8": float(np.mean(per_i8)),
        "dice_int8_vs_fp32": float(np.mean(agree)),
        "volume_seconds_torch_fp32": fp32["forward_seconds"],
        "volume_seconds_int8": int8["forward_seconds"],
        "volume_speedup": fp32["forward_seconds"] / int8["forward_seconds"],
        "total_seconds_torch_fp32": fp32["total_seconds"],
        "total_seconds_int8": int8["total_seconds"],
        "warmup_seconds_torch_fp32": fp32["warmup_seconds"],
        "warmup_seconds_int8": int8["warmup_seconds"],
        "per_organ_dice": per_organ,
        "volumes": fp32["volumes"],
        "outputs": {"fp32": str(fp32_dir), "int8": str(int8_dir)},
    }
    log(f"Dice vs labels FP32 {result['dice_fp32']:.4f}, INT8 {result['dice_int8']:.4f} "
        f"(delta {result['dice_int8'] - result['dice_fp32']:+.4f}); Dice INT8 vs FP32 "
        f"{result['dice_int8_vs_fp32']:.4f}; ONNX {result['size_ratio']:.2f}x smaller")
    return result
