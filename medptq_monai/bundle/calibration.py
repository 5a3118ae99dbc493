"""``BundleCalibrator``: the calibration workflow behind ``configs/calibrate.json``."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibrate.calibrators import DEFAULT_CALIBRATOR
from ..calibrate.patches import PatchPlan, sample_patches
from ..calibrate.quantize import QuantizeOptions, quantize_onnx
from ..errors import CalibrationError
from ..export.onnx_model import io_spec, load_onnx
from ..export.torch_export import export_fp32
from ..fileio import sha256_file

logger = logging.getLogger(__name__)


class BundleCalibrator:
    """Export (or take) the FP32 ONNX, cut seeded patches from the bundle's preprocessed data,
    calibrate, and write ``<output_dir>/model.onnx`` and ``<output_dir>/model_int8.onnx``.

    ``dataset`` is the bundle's MONAI dataset (its ``preprocessing`` applied). The model is the
    bundle ``network_def`` + ``checkpoint``, or ``source_onnx``: an FP32 ONNX exported elsewhere
    (e.g. the MedPTQ ``unet_fp32.onnx``), which must match the bundle's channels/classes/roi.
    ``quantize_attention`` also quantizes MatMuls between two activations (attention scores and
    attention-weighted values); by default they stay float. ``calibration_roi`` (smaller than
    ``roi_size``) calibrates a second export of the network at that patch size and applies its
    ranges to the ``roi_size`` model: calibration memory scales with the patch volume (VISTA3D).
    """

    def __init__(
        self,
        dataset: Sequence,
        output_dir: str | os.PathLike,
        in_channels: int,
        num_classes: int,
        roi_size: Sequence[int],
        network: torch.nn.Module | None = None,
        checkpoint: str | os.PathLike | None = None,
        source_onnx: str | os.PathLike | None = None,
        calibrator: str = DEFAULT_CALIBRATOR,
        num_patches: int = 32,
        seed: int = 0,
        percentile: float = 99.99,
        exclude: Sequence[str] = (),
        quantize_attention: bool = False,
        calibration_roi: Sequence[int] | None = None,
        foreground_fraction: float = 0.5,
        foreground_threshold: float = 0.0,
        image_key: str = "image",
        fp32_name: str = "model.onnx",
        int8_name: str = "model_int8.onnx",
        progress: bool = True,
    ) -> None:
        if network is None and source_onnx is None:
            raise CalibrationError("give either network (+ checkpoint) or source_onnx")
        self.options = QuantizeOptions(
            calibrator=calibrator, seed=int(seed), percentile=float(percentile), exclude=tuple(exclude),
            quantize_activation_matmul=bool(quantize_attention),
        )
        self.roi_size = tuple(int(r) for r in roi_size)
        calib_roi = tuple(int(r) for r in calibration_roi) if calibration_roi is not None else self.roi_size
        if len(calib_roi) != len(self.roi_size) or any(c <= 0 or c > r for c, r in zip(calib_roi, self.roi_size)):
            raise CalibrationError(f"calibration_roi {list(calib_roi)} must have one positive size per axis, "
                                   f"each at most roi_size {list(self.roi_size)}")
        if calib_roi != self.roi_size and (network is None or source_onnx is not None):
            raise CalibrationError("a calibration_roi smaller than roi_size needs the network (it is exported "
                                   "again at that size), not a source_onnx")
        self.plan = PatchPlan(
            roi_size=calib_roi, num_patches=int(num_patches), seed=int(seed),
            foreground_fraction=float(foreground_fraction), foreground_threshold=float(foreground_threshold),
        )
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        self.network, self.checkpoint, self.source_onnx = network, checkpoint, source_onnx
        self.image_key = image_key
        self.fp32_path = self.output_dir / fp32_name
        self.int8_path = self.output_dir / int8_name
        self.progress = progress

    def _write_fp32(self, dest: Path) -> str | None:
        """Write the FP32 ONNX to ``dest`` (checked against the bundle); return the source sha256."""
        if self.source_onnx is not None:
            src = Path(self.source_onnx)
            self._check_spec(src)
            shutil.copyfile(src, dest)
            return sha256_file(src)
        export_fp32(self.network, dest, self.in_channels, self.roi_size, checkpoint=self.checkpoint)
        self._check_spec(dest)
        return sha256_file(self.checkpoint) if self.checkpoint else None

    def _check_spec(self, path: Path) -> None:
        io_spec(load_onnx(path, load_weights=False)).check_bundle(path, self.in_channels, self.num_classes,
                                                                   self.roi_size)

    def _volumes(self):
        for item in self.dataset:
            if isinstance(item, list):  # a dataset whose transforms return several crops
                raise CalibrationError("calibration dataset items must be single volumes, not lists of crops")
            yield item[self.image_key] if isinstance(item, dict) else item

    def run(self) -> dict:
        """Run export + calibration + quantization; returns a summary (also logged)."""
        try:
            count = len(self.dataset)
        except TypeError:
            count = None
        if count == 0:
            raise CalibrationError("no calibration data: the dataset is empty (check --dataset_dir)")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # both files are built in a scratch folder and moved into place only when both succeeded
        with tempfile.TemporaryDirectory(prefix=".calibrating-", dir=self.output_dir) as scratch:
            fp32, int8 = Path(scratch) / self.fp32_path.name, Path(scratch) / self.int8_path.name
            source_sha = self._write_fp32(fp32)
            calibration_model = None
            if self.plan.roi_size != self.roi_size:
                calibration_model = Path(scratch) / "calibration_roi.onnx"
                export_fp32(self.network, calibration_model, self.in_channels, self.plan.roi_size,
                            checkpoint=self.checkpoint)
            patches = sample_patches(self._volumes(), self.plan, num_volumes=count)
            with tqdm(total=self.plan.num_patches, desc=f"calibrating ({self.options.calibrator})",
                      unit="patch", disable=not self.progress) as bar:
                result = quantize_onnx(
                    fp32, int8, patches, self.options, source_sha256=source_sha, on_patch=lambda _n: bar.update(1),
                    calibration_model=calibration_model,
                )
            if calibration_model is not None:
                calibration_model.unlink()
            for tmp, final in ((fp32, self.fp32_path), (int8, self.int8_path)):
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)
        summary = {
            "fp32_onnx": str(self.fp32_path),
            "int8_onnx": str(self.int8_path),
            "fp32_bytes": self.fp32_path.stat().st_size,
            "int8_bytes": self.int8_path.stat().st_size,
            "calibrator": self.options.calibrator,
            "num_patches": result.num_patches,
            "calibration_roi": list(self.plan.roi_size),
            "seed": self.options.seed,
            "quantized_nodes": len(result.quantized_nodes),
            "excluded_nodes": result.excluded_nodes,
        }
        logger.info("calibration done: %s", summary)
        return summary


def capped_roi(roi_size: Sequence[int], cap: int | None) -> list[int]:
    """``roi_size`` with every axis at most ``cap`` (``None``: unchanged); the bundles' calibration patch size."""
    return [int(r) if cap is None else min(int(r), int(cap)) for r in roi_size]
