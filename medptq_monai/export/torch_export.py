"""torch ``nn.Module`` → FP32 ONNX with a dynamic batch axis."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch

from .. import __version__
from ..errors import ModelFileError
from ..fileio import atomic_path, sha256_file
from .onnx_model import save_onnx, set_metadata

INPUT_NAME = "input"
OUTPUT_NAME = "output"
DEFAULT_OPSET = 17


def load_checkpoint(module: torch.nn.Module, checkpoint: str | os.PathLike) -> torch.nn.Module:
    """Load a state dict (plain, or under a ``model``/``state_dict`` key) into ``module``."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ModelFileError(f"checkpoint not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelFileError(f"corrupt checkpoint {path}: {err}") from err
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ModelFileError(f"checkpoint {path} does not match the network: {err}") from err
    return module


def export_fp32(
    module: torch.nn.Module,
    path: str | os.PathLike,
    in_channels: int,
    roi_size: Sequence[int],
    opset: int = DEFAULT_OPSET,
    checkpoint: str | os.PathLike | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Export ``module`` (eval mode, CPU, FP32) to ONNX with input ``input`` [N, C, *roi] → ``output``.

    If ``checkpoint`` is given it is loaded into ``module`` first and its sha256 is recorded.
    The batch axis is dynamic; the spatial shape is the bundle's roi. ``metadata_props`` record
    the package version and any ``metadata`` given. Written atomically.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    if checkpoint is not None:
        load_checkpoint(module, checkpoint)
    module = module.float().cpu().eval()
    dummy = torch.zeros((1, int(in_channels), *[int(r) for r in roi_size]), dtype=torch.float32)
    with atomic_path(path, suffix=".onnx") as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (dummy,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        model = onnx.load(str(tmp))
        meta: dict[str, object] = {"medptq.version": __version__, "medptq.precision": "fp32"}
        if checkpoint is not None:
            meta["medptq.source_sha256"] = sha256_file(checkpoint)
            meta["medptq.source"] = Path(checkpoint).name
        set_metadata(model, {**meta, **(metadata or {})})
        save_onnx(model, tmp)
    return Path(path)
