"""What a cohort run needs to know about the bundle, checked in the driver before any worker starts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..bundle.overlay import OVERLAY_NAME, int8_configs
from ..bundle.runner import bundle_parser
from ..engines import check_engine_name, check_precision
from ..errors import BundleConfigError, MedPTQError, ModelFileError
from ..fileio import sha256_file

MODEL_FILE_IDS = ("engine_model_file", "model_file")  # the overlay's id, then our bundles' own


@dataclass(frozen=True)
class BundleJob:
    """A quantized bundle and the engine/precision to run it with (picklable: it travels to every worker)."""

    bundle: str
    configs: tuple[str, ...]
    engine: str
    precision: str
    model_file: str
    model_sha256: str
    image_key: str
    in_channels: int | None


def _image_key(parser) -> str:
    if "image_key" in parser:
        key = parser.get_parsed_content("image_key")
        if isinstance(key, str) and key:
            return key
    return "image"


def prepare_job(bundle: str | os.PathLike, engine: str = "auto", precision: str = "int8") -> BundleJob:
    """Check the bundle (configs, quantized model file) and the engine/precision names; hash the model file.

    Raises ``BundleConfigError`` for a missing or unquantized bundle, ``ModelFileError`` for a missing model
    file, ``UnknownNameError`` for unknown names. Nothing is written.
    """
    root = Path(bundle).resolve()
    if not root.is_dir():
        raise BundleConfigError(f"bundle folder not found: {root}")
    if engine == "torch":
        raise BundleConfigError("engine 'torch' is the FP32 reference of `python -m monai.bundle run`; cohort "
                                "inference runs the bundle's INT8/FP32 engine (auto, openvino, onnxruntime, tensorrt)")
    check_engine_name(engine)
    check_precision(precision)
    configs = int8_configs(root)
    try:
        parser = bundle_parser(root, configs, engine=engine, precision=precision)
    except MedPTQError as err:
        raise BundleConfigError(str(err)) from err
    except Exception as err:
        raise BundleConfigError(f"cannot read the configs of bundle {root}: {err}") from err
    model_id = next((i for i in MODEL_FILE_IDS if i in parser), None)
    if model_id is None:
        raise BundleConfigError(f"bundle {root} is not quantized (no configs/{OVERLAY_NAME} and no engine model "
                                f"in its configs): run `medptq quantize {root}` first")
    for needed in ("preprocessing", "inferer", "postprocessing", "network"):
        if needed not in parser:
            raise BundleConfigError(f"bundle {root}: the configs {list(configs)} define no `{needed}`")
    model_file = str(parser.get_parsed_content(model_id))
    if not os.path.isfile(model_file) or os.path.getsize(model_file) == 0:
        raise ModelFileError(f"model file not found or empty: {model_file} (precision {precision}); create it "
                             f"with `medptq quantize {root}`")
    in_channels = parser.get("_meta_#network_data_format#inputs#image#num_channels")
    return BundleJob(
        bundle=str(root), configs=tuple(configs), engine=engine, precision=precision, model_file=model_file,
        model_sha256=sha256_file(model_file), image_key=_image_key(parser),
        in_channels=int(in_channels) if isinstance(in_channels, int) else None,
    )
