"""``configs/inference_int8.json``: the overlay that swaps a bundle's ``network`` for its INT8 engine.

Merged after the bundle's own ``inference.json`` (as the zoo's ``inference_trt.json`` is), it replaces
only ``network``; preprocessing, inferer, postprocessing and writer run unchanged. The bundle's own
checkpoint loading (``checkpointloader`` in ``initialize``, ``CheckpointLoader`` handlers,
``load_state_dict`` expressions) keeps running: it loads ``models/model.pt`` into ``network``, and
``SourceCheckedEngineNetwork.load_state_dict`` checks that this is the checkpoint the INT8 model was
made from and keeps the engine. A different checkpoint (retrained after quantizing) is an error, never
a silent switch to FP32 weights or a stale INT8 model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import BundleConfigError, ModelFileError
from ..export.onnx_model import load_onnx, metadata
from .bundle_config import IN_CHANNELS_ID, OUT_CHANNELS_ID
from .network import EngineNetwork

logger = logging.getLogger(__name__)

OVERLAY_NAME = "inference_int8.json"
FP32_NAME = "model.onnx"
INT8_NAME = "model_int8.onnx"
NETWORK_TARGET = "medptq_monai.bundle.overlay.SourceCheckedEngineNetwork"
OVERLAY_IDS = ("engine", "precision", "engine_model_file")  # the ids the overlay adds beside ``network``
DIGEST_KEY = "medptq.source_digest"  # metadata_props key: state_digest of the checkpoint a model was made from


def unwrap_state(state: Any) -> Any:
    """The state dict inside a checkpoint saved as ``{'model': ...}`` or ``{'state_dict': ...}``."""
    if isinstance(state, Mapping):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], Mapping):
                return state[key]
    return state


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and values (device and file format do not matter)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


class SourceCheckedEngineNetwork(EngineNetwork):
    """``EngineNetwork`` that knows the checkpoint its model was quantized from (``source_digest``, a
    ``state_digest``; by default the model file's ``medptq.source_digest``) and accepts exactly that state
    dict from the bundle's checkpoint loaders.

    ``load_state_dict`` never changes what runs: the matching checkpoint is acknowledged, a
    different one raises ``ModelFileError`` (re-run ``medptq quantize``). ``engine='torch'`` is
    refused: the FP32 torch reference is the bundle's ``inference.json`` alone.
    """

    def __init__(self, model_file: str | os.PathLike, source_digest: str | None = None, engine: str = "auto",
                 **kwargs: Any) -> None:
        if engine == "torch":
            raise BundleConfigError("engine 'torch' is not served by the INT8 overlay: run the bundle's "
                                    "configs/inference.json alone for the FP32 torch reference")
        if not os.path.isfile(model_file):
            raise ModelFileError(f"model file not found: {model_file}; create it with: medptq quantize <bundle>")
        super().__init__(model_file, engine=engine, **kwargs)
        self.model_file = str(model_file)
        self.source_digest = source_digest or metadata(load_onnx(model_file, load_weights=False)).get(DIGEST_KEY)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Check ``state_dict`` against the quantized model's source checkpoint; the engine is kept."""
        state = unwrap_state(state_dict)
        if not isinstance(state, Mapping) or not state:
            logger.warning("%s: an empty state dict was loaded into the INT8 network (ignored; the checkpoint "
                           "could not be checked against the INT8 model)", self.model_file)
        elif self.source_digest is None:
            logger.warning("%s: no source digest recorded; a state dict loaded into the INT8 network is ignored",
                           self.model_file)
        elif state_digest(state) != self.source_digest:
            raise ModelFileError(
                f"the checkpoint loaded into `network` is not the one {self.model_file} was quantized from "
                "(models/model.pt changed since?): re-run `medptq quantize` on this bundle, or load the "
                "checkpoint it was made from"
            )
        else:
            logger.info("%s: checkpoint matches the INT8 model's source; running the %s engine",
                        self.model_file, self.precision)
        return torch.nn.modules.module._IncompatibleKeys([], [])


def int8_configs(bundle_dir: str | os.PathLike) -> tuple[str, ...]:
    """The config files (names under ``configs/``) that run a bundle INT8: ``inference.json``, then the overlay
    written by ``medptq quantize`` when the bundle has one."""
    overlay = os.path.join(os.fspath(bundle_dir), "configs", OVERLAY_NAME)
    return ("inference.json", OVERLAY_NAME) if os.path.isfile(overlay) else ("inference.json",)


def overlay_text(overlay: Mapping[str, Any]) -> str:
    """The overlay file's text (one formatting for ``medptq quantize`` and the bundle template)."""
    return json.dumps(overlay, indent=4) + "\n"


def render_overlay(roi_size: Sequence[int] | None, has_device: bool, has_models_dir: bool) -> dict[str, Any]:
    """The overlay config. ``roi_size`` ``None`` means the bundle's ``inferer#roi_size`` is referenced (so a
    changed inferer roi is caught when the network is built); otherwise the given roi is written. The model
    files are read from the bundle's ``models_dir`` id when it has one (so a config such as a small-model
    overlay that moves ``models_dir`` moves the INT8 files too), else from ``<bundle_root>/models``."""
    models = "@models_dir + '/'" if has_models_dir else "@bundle_root + '/models/'"
    return {
        "engine": "auto",
        "precision": "int8",
        "engine_model_file": f"${models} + ('{INT8_NAME}' if @precision == 'int8' else '{FP32_NAME}')",
        "network": {
            "_target_": NETWORK_TARGET,
            "model_file": "@engine_model_file",
            "engine": "@engine",
            "precision": "@precision",
            "device": "@device" if has_device else "cpu",
            "in_channels": f"@{IN_CHANNELS_ID}",
            "num_classes": f"@{OUT_CHANNELS_ID}",
            "roi_size": "@inferer#roi_size" if roi_size is None else [int(r) for r in roi_size],
            "cache_dir": "$@bundle_root + '/.cache'",
        },
    }
