"""``medptq`` command line (fire): quantize, sensitivity, check, demo, fidelity, bench, bench_volume, pack,
import_nnunet, info."""

from __future__ import annotations

import sys
from pathlib import Path

import fire

from .errors import MedPTQError


class Commands:
    """medptq-monai: INT8 post-training quantization for MONAI 3D segmentation bundles."""

    def quantize(self, bundle: str, config_file=None, meta_file: str | None = None, checkpoint: str | None = None,
                 roi_size=None, calibrator: str | None = None, num_patches: int | None = None,
                 seed: int | None = None, exclude=None, heldout_patches: int = 4, progress: bool = True,
                 calibration_roi=None, high_precision: str = "fp32", rewrite_deconv: bool = False,
                 max_dice_drop: float | None = None, metric: str = "dice_vs_fp32", validation_patches: int = 8,
                 max_float_fraction: float = 0.5, accuracy_engine: str = "auto",
                 ort_output_budget_db: float | None = None, **overrides) -> dict:
        """INT8 for any MONAI bundle (zoo layout, or ours): writes model.onnx and model_int8.onnx into the
        bundle's models_dir (models/ when it has none) and configs/inference_int8.json, then prints a summary. Run it with:
        python -m monai.bundle run --config_file "['B/configs/inference.json','B/configs/inference_int8.json']"
        --bundle_root B --dataset_dir D.

        CONFIG_FILE: the bundle's config(s), default configs/inference.json (a list is merged in order, e.g.
        "['B/configs/inference.json','B/configs/small.json']"). CHECKPOINT: default model.pt in the bundle's
        models_dir (models/). ROI_SIZE: default inferer#roi_size. CALIBRATOR, NUM_PATCHES, SEED, EXCLUDE
        (comma-separated node-name patterns kept in float) and CALIBRATION_ROI default to the bundle metadata's
        quantization section, else mse / 32 / 0 / none. Other --key value pairs override config ids
        (--dataset_dir D, --datalist [...], --data_list_file_path F), as with monai.bundle run.
        HIGH_PRECISION fp16 / REWRITE_DECONV: TensorRT variants of the INT8 file (FP16 remainder; stride-2
        kernel-2 ConvTranspose as INT8 Conv + depth-to-space); the printed held-out SQNR is the INT8+FP32 file's.
        MAX_DICE_DROP X (0 < X < 1): accuracy-aware PTQ, the most harmful layers return to float until the Dice
        drop (METRIC dice_vs_fp32 or dice_vs_labels) on VALIDATION_PATCHES seeded patches of a validation set is
        <= X, at most MAX_FLOAT_FRACTION of the layers; the validation set comes like the calibration data with
        --val_ overrides (--val_dataset_dir D2, --val_datalist [...], --val_data_list_file_path F), disjoint;
        the candidates run on ACCURACY_ENGINE (auto: OpenVINO when installed, else onnxruntime).
        ORT_OUTPUT_BUDGET_DB (default: metadata quantization.ort_output_budget_db, else 0.2; 0: off): the SQNR
        that output quantizers recorded for ONNX Runtime may cost, so that it runs those convolutions in INT8.
        """
        from .bundle.quantize_bundle import quantize_bundle
        from .calibrate.quantize import check_high_precision

        check_high_precision(high_precision)
        summary = quantize_bundle(bundle, config_file=config_file, meta_file=meta_file, checkpoint=checkpoint,
                                  roi_size=roi_size, calibrator=calibrator, num_patches=num_patches, seed=seed,
                                  exclude=exclude, heldout_patches=heldout_patches, progress=progress,
                                  calibration_roi=calibration_roi, max_dice_drop=max_dice_drop, metric=metric,
                                  validation_patches=validation_patches, max_float_fraction=max_float_fraction,
                                  accuracy_engine=accuracy_engine, ort_output_budget_db=ort_output_budget_db,
                                  **overrides)
        root = Path(bundle)
        return _tensorrt_variants(summary, root / summary["int8_onnx"], root / summary["fp32_onnx"], high_precision,
                                  rewrite_deconv)

    def sensitivity(self, bundle: str, dataset_dir: str, calibrator: str | None = None, num_patches: int = 8,
                    seed: int = 0, top: int = 10, overlays: str = "") -> dict:
        """Per-layer INT8 sensitivity of a quantized bundle (its FP32 models_dir/model.onnx): output SQNR (dB)
        with only that layer quantized, most sensitive first; candidates for medptq quantize --exclude (or
        metadata quantization.float_layers). CALIBRATOR defaults to the bundle's (metadata quantization.calibrator); OVERLAYS: e.g. small.json."""
        from .bundle.runner import bundle_parser
        from .calibrate.patches import PatchPlan, sample_patches
        from .calibrate.calibrators import DEFAULT_CALIBRATOR
        from .calibrate.quantize import QuantizeOptions
        from .calibrate.sensitivity import layer_sensitivity

        configs = ["inference.json", *[o for o in str(overlays).split(",") if o]]
        parser = bundle_parser(bundle, configs, dataset_dir=dataset_dir)
        quantization = parser.get_parsed_content("_meta_").get("quantization", {})
        calibrator = calibrator or quantization.get("calibrator", DEFAULT_CALIBRATOR)
        dataset = parser.get_parsed_content("dataset")
        plan = PatchPlan(roi_size=tuple(parser.get_parsed_content("roi_size")), num_patches=num_patches, seed=seed)
        patches = list(sample_patches((item["image"] for item in dataset), plan, num_volumes=len(dataset)))
        fp32 = parser.get_parsed_content("models_dir") + "/model.onnx"
        result = layer_sensitivity(fp32, patches, QuantizeOptions(calibrator=calibrator, seed=seed))
        result["layers"] = result["layers"][: int(top)]
        return result

    def check(self, onnx: str) -> dict:
        """Static TensorRT explicit-quantization check of a QDQ ONNX; exits non-zero on any issue."""
        from .export.onnx_model import load_onnx
        from .export.trt_check import assert_tensorrt_compatible, qdq_summary

        model = load_onnx(onnx)
        assert_tensorrt_compatible(model, name=onnx)
        return qdq_summary(model)

    def demo(self, bundle: str = "bundles/unet_int8", data_dir: str = "tests/data/totalseg_ct",
             out_dir: str = "reports", engine: str = "auto") -> None:
        """The main job: calibrate, FP32 + INT8 whole-volume inference on the real CT, reports/demo.{json,md}."""
        from .demo import run_demo

        run_demo(bundle, data_dir, out_dir, engine)

    def fidelity(self, bundle: str, overlays: str = "", data_dir: str = "tests/data/totalseg_ct",
                 out_dir: str = "reports/fidelity", engine: str = "auto", calib_patches: int | None = None) -> dict:
        """Calibrate BUNDLE (with comma-separated config OVERLAYS, e.g. small.json) on another patient, segment
        DATA_DIR/images in torch FP32 and INT8, print Dice vs labels and Dice(INT8 vs FP32)."""
        from .fidelity import check_fidelity

        names = [o for o in (overlays.split(",") if isinstance(overlays, str) else overlays) if o]
        result = check_fidelity(bundle, data_dir, Path(out_dir) / Path(bundle).name, engine, names, calib_patches)
        result.pop("per_organ_dice")
        return result

    def infer(self, bundle: str, input: str, output_dir: str, engine: str = "auto", precision: str = "int8",
              workers: int | None = None, threads: int | None = None, ray_address: str | None = None,
              force: bool = False, data_list_key: str = "testing", max_attempts: int = 2,
              progress: bool = True) -> None:
        """Cohort inference: segment every case of INPUT (a folder of NIfTIs or DICOM series folders, or a decathlon
        datalist JSON) with BUNDLE's engine into OUTPUT_DIR, resumable through OUTPUT_DIR/manifest.jsonl. WORKERS
        processes here (default 1), or actors on the Ray cluster at RAY_ADDRESS (host:port, auto, local; needs
        the [cluster] extra). FORCE redoes cases already done. Exits 1 when any case failed."""
        from .cohort import run_cohort

        summary = run_cohort(bundle, input, output_dir, engine=engine, precision=precision, workers=workers,
                             threads=threads, ray_address=ray_address, force=force, data_list_key=data_list_key,
                             max_attempts=max_attempts, progress=progress)
        if summary["failed"]:
            raise SystemExit(1)

    def bench(self, bundles_dir: str = "bundles", data_dir: str = "tests/data/totalseg_ct", out_dir: str = "reports",
              only: str | None = None, quick: bool = False, repeats: int = 3, warmup: int = 1,
              calib_patches: int = 8, threads: int | None = None, nncf: bool = True) -> None:
        """All bundles at full size in one run: sizes, calibration peak memory, per-patch latency of torch FP32,
        ONNX Runtime and OpenVINO FP32/INT8, SQNR; reports/benchmark.{json,md,png}. ONLY: comma-separated
        bundle names. QUICK: 3 timed calls (more, up to 9, while they total under 3 s), 2 calibration patches.
        NNCF: NNCF's INT8 on the same patches beside medptq's (needs the peer extra)."""
        from .benchmark_suite import run_suite

        run_suite(bundles_dir=bundles_dir, data_dir=data_dir, out_dir=out_dir, only=only, quick=quick,
                  repeats=repeats, warmup=warmup, calib_patches=calib_patches, threads=threads, nncf=nncf)

    def bench_volume(self, bundle: str = "bundles/unet_int8", data_dir: str = "tests/data/totalseg_ct",
                     out_dir: str = "reports", repeats: int = 10, warmup: int = 2, engines: str | None = None,
                     quick: bool = False, calibrate: bool = False, threads: int | None = None,
                     volume_repeats: int = 3, calib_patches: int | None = None) -> None:
        """One bundle in depth: torch FP32 vs ONNX Runtime / OpenVINO / TensorRT FP32 and INT8, per patch and whole
        volume (sliding window), Dice; reports/volume_benchmark.{json,md,png}."""
        from .benchmark import run_benchmark

        run_benchmark(bundle=bundle, data_dir=data_dir, out_dir=out_dir, repeats=repeats, warmup=warmup,
                      engines=engines, quick=quick, calibrate=calibrate, threads=threads,
                      volume_repeats=volume_repeats, calib_patches=calib_patches)

    def pack(self, bundle: str, base_url: str, out_dir: str = "dist", version: str | None = None) -> dict:
        """Pack a calibrated bundle for `python -m monai.bundle download --url` + `download_large_files`.

        Writes OUT_DIR/<name>_v<version>.zip, OUT_DIR/files/<name>/<version>/<model files> and
        OUT_DIR/index.json; serve OUT_DIR at BASE_URL.
        """
        from .bundle.pack import pack_bundle

        return pack_bundle(bundle, out_dir, base_url, version)

    def import_nnunet(self, results_dir: str, bundle_dir: str, fold: int | str = 0, configuration: str | None = None,
                      checkpoint: str = "checkpoint_final.pth", overwrite: bool = False,
                      allow_pickle: bool = False) -> dict:
        """Turn a trained nnU-Net v2 results folder (plans.json, dataset.json, fold_X/CHECKPOINT) into a ready
        nnunet_int8-style bundle at BUNDLE_DIR (then calibrate it). ALLOW_PICKLE: trust a checkpoint that
        torch's safe loader refuses."""
        from .bundle.nnunet_import import import_nnunet

        return import_nnunet(results_dir, bundle_dir, fold=fold, configuration=configuration, checkpoint=checkpoint,
                             overwrite=overwrite, allow_pickle=allow_pickle)

    def info(self) -> dict:
        """Machine, INT8 ISA per CPU engine, registered engines (installed or not), calibrators, versions."""
        from .calibrate.calibrators import CALIBRATORS, DEFAULT_CALIBRATOR
        from .engines import engine_names, engine_spec, first_cpu_engine
        from .engines.tensorrt_engine import tensorrt_available
        from .machine import machine_info

        usable, reason = tensorrt_available()
        engines = {name: {"label": engine_spec(name).label, "devices": list(engine_spec(name).devices),
                          "precisions": list(engine_spec(name).precisions), "installed": engine_spec(name).installed()}
                   for name in engine_names(include_auto=False)}
        return {**machine_info(), "engines": engines, "auto_cpu_engine": first_cpu_engine(),
                "calibrators": list(CALIBRATORS), "default_calibrator": DEFAULT_CALIBRATOR,
                "tensorrt_usable": usable, "tensorrt_reason": reason}


def _tensorrt_variants(summary: dict, int8: str | Path, fp32: str | Path, high_precision: str,
                       rewrite_deconv: bool) -> dict:
    """Apply the TensorRT variants (FP16 remainder, deconv rewrite) to the INT8 file just written."""
    if high_precision != "fp32" or rewrite_deconv:
        from .calibrate.quantize import apply_tensorrt_variants_file

        summary["tensorrt_variants"] = apply_tensorrt_variants_file(int8, high_precision, bool(rewrite_deconv), fp32)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors from bad input print one clear line and exit with status 2."""
    try:
        fire.Fire(Commands, command=argv, name="medptq")
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, MedPTQError):
            cause = cause.__cause__  # MONAI wraps component errors in RuntimeError
        if cause is None:
            raise
        print(f"medptq: error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
