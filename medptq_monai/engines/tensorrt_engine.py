"""TensorRT engine: builds (and caches) a strongly typed TensorRT plan from an ONNX file.

Written against the documented Python API of TensorRT 10.x and 11.x (name-based tensor API,
``execute_async_v3``, strongly typed networks, explicit Q/DQ quantization; no
``BuilderFlag.INT8/FP16``, no calibrators). It has NOT been run on real hardware in this
project: there is no TensorRT on the project's machines, so only the parts that need no
GPU (availability check, cache keys, error paths) are tested here.

* ``int8``: the QDQ ONNX is built as is (explicit quantization).
* ``fp16``: the FP32 ONNX is first converted to an FP16 graph (FP32 inputs/outputs kept),
  because a strongly typed network runs each layer in the dtype the graph gives it.
* ``fp32``: the FP32 ONNX is built as is.

Plans are tied to the GPU model and TensorRT version; they are cached under
``<cache_dir>/<key>.plan`` with :func:`plan_cache_key`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch

from ..errors import EngineUnavailableError, InputImageError, ModelFileError, UnknownNameError
from ..export.onnx_model import load_onnx
from ..fileio import atomic_path, sha256_file
from .base import PRECISIONS, Engine, EngineContext

log = logging.getLogger(__name__)

PLAN_FORMAT = "medptq-trt-plan-v1"
INSTALL_HINT = "pip install medptq-monai[tensorrt]"


@functools.lru_cache(maxsize=1)
def tensorrt_available() -> tuple[bool, str]:
    """``(True, "")`` if TensorRT >= 10 imports and torch sees a CUDA GPU, else ``(False, reason)``."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, f"the 'tensorrt' package is not installed ({INSTALL_HINT})"
    except Exception as err:  # e.g. OSError for a missing libnvinfer
        return False, f"the 'tensorrt' package failed to import: {type(err).__name__}: {err}"
    version = str(getattr(trt, "__version__", "0"))
    if _major(version) < 10:
        return False, f"TensorRT {version} is too old: 10.x or newer is needed ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    return True, ""


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def plan_cache_key(
    onnx_sha256: str, trt_version: str, gpu: str, precision: str, profile: tuple[int, int, int]
) -> str:
    """Hex sha256 identifying a plan: ONNX hash, TensorRT version, GPU, precision, (min, opt, max) batch."""
    payload = {
        "format": PLAN_FORMAT,
        "onnx_sha256": onnx_sha256,
        "tensorrt": trt_version,
        "gpu": gpu,
        "precision": precision,
        "profile": [int(b) for b in profile],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def gpu_identity(device: torch.device) -> str:
    """GPU name and compute capability, e.g. ``"NVIDIA H100 80GB HBM3 sm_90"``."""
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} sm_{props.major}{props.minor}"


def _network_flags(trt: Any) -> int:
    """STRONGLY_TYPED on 10.x; 0 on 11.x, where strong typing is always on and the flag is deprecated."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if _major(trt.__version__) < 11 and flag is not None:
        return 1 << int(flag)
    return 0


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int8": torch.int8,
        "int32": torch.int32,
        "int64": torch.int64,
        "bool": torch.bool,
    }
    for name, tdtype in table.items():
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return tdtype
    raise ModelFileError(f"TensorRT tensor dtype {dtype} has no torch equivalent")


def convert_to_fp16_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write an FP16 copy of the FP32 ONNX ``src`` to ``dst``, keeping FP32 graph inputs/outputs.

    Strongly typed TensorRT networks run each layer in the graph's dtype, so FP16 inference
    needs an FP16 graph rather than a builder flag.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(load_onnx(src), keep_io_types=True)
    OnnxModel.graph_topological_sort(model.graph)  # the converter appends its I/O casts last
    dst = Path(dst)
    with atomic_path(dst, suffix=".onnx") as tmp:
        big = model.ByteSize() > (1 << 30)
        onnx.save(model, str(tmp), save_as_external_data=big, location=f"{dst.name}.data")
    return dst


class TensorRTEngine(Engine):
    """TensorRT inference on one CUDA GPU from an FP32 (fp32/fp16) or QDQ (int8) ONNX file."""

    name = "tensorrt"

    def __init__(
        self,
        model_path: str | os.PathLike,
        precision: str = "int8",
        device: str | torch.device = "cuda",
        cache_dir: str | os.PathLike | None = None,
        max_batch: int = 8,
        opt_batch: int = 4,
        workspace_bytes: int = 4 << 30,
    ) -> None:
        super().__init__(model_path, precision, device)  # ModelFileError for a missing/corrupt ONNX
        if precision not in PRECISIONS:
            raise UnknownNameError(f"unknown precision {precision!r} for TensorRT; choose one of {PRECISIONS}")
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT runs on CUDA devices only, got device {self.device}")
        if not 1 <= opt_batch <= max_batch:
            raise ValueError(f"need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}")
        if any(d is None for d in self.spec.input_shape[1:]):
            raise ModelFileError(
                f"{self.model_path}: TensorRT engine needs static channel/spatial dims, "
                f"input {self.spec.input_name!r} has shape {self.spec.input_shape}"
            )
        ok, reason = tensorrt_available()
        if not ok:
            raise EngineUnavailableError(f"TensorRT engine unavailable: {reason}")

        import tensorrt as trt

        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        static_batch = self.spec.input_shape[0]
        # A static batch axis admits exactly one shape: no profile, chunks padded to that size.
        self._static_batch: int | None = static_batch
        self.profile = (static_batch,) * 3 if static_batch else (1, int(opt_batch), int(max_batch))
        self.workspace_bytes = int(workspace_bytes)
        self.gpu = gpu_identity(self.device)
        self.trt_version = str(trt.__version__)
        key = plan_cache_key(sha256_file(self.model_path), self.trt_version, self.gpu, precision, self.profile)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.model_path.parent / ".trt_cache"
        self.plan_path = self.cache_dir / f"{key}.plan"
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self._engine, self.cache_hit = self._load_or_build()
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineUnavailableError(f"TensorRT could not create an execution context for {self.plan_path}")
        self._inputs, self._outputs = self._io_names()
        self._in_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self.spec.input_name))
        self._out_dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in self._outputs}

    @classmethod
    def build(cls, model_path: str | os.PathLike | None, precision: str, device: torch.device,
              context: EngineContext) -> TensorRTEngine:
        """On the CUDA device asked for (the current one when a CPU device was passed)."""
        return cls(model_path, precision, device if device.type == "cuda" else "cuda", cache_dir=context.cache_dir)

    # ---- build / cache -------------------------------------------------------------------

    def _load_or_build(self) -> tuple[Any, bool]:
        if self.plan_path.is_file():
            engine = self._deserialize(self.plan_path.read_bytes())
            if engine is not None:
                return engine, True
            log.warning("TensorRT plan %s failed to deserialize (corrupt or stale); rebuilding", self.plan_path)
        plan = self._build_plan()
        with atomic_path(self.plan_path, suffix=".plan") as tmp:
            tmp.write_bytes(plan)
        engine = self._deserialize(plan)
        if engine is None:
            raise ModelFileError(f"TensorRT built a plan from {self.model_path} but could not deserialize it")
        return engine, False

    def _deserialize(self, plan: bytes) -> Any:
        try:
            return self._runtime.deserialize_cuda_engine(plan)
        except Exception as err:  # the bindings may raise instead of returning None
            log.debug("deserialize_cuda_engine failed: %s", err)
            return None

    def _build_plan(self) -> bytes:
        if self.precision == "int8":
            ops = {node.op_type for node in load_onnx(self.model_path, load_weights=False).graph.node}
            if "DequantizeLinear" not in ops:
                raise ModelFileError(
                    f"precision int8 needs a QDQ ONNX (explicit quantization), {self.model_path} has no "
                    "DequantizeLinear nodes; quantize it first or use precision fp32/fp16"
                )
        if self.precision != "fp16":
            return self._build_from(self.model_path)
        with tempfile.TemporaryDirectory(prefix="medptq_trt_fp16_") as tmp:
            return self._build_from(convert_to_fp16_onnx(self.model_path, Path(tmp) / "model.fp16.onnx"))

    def _build_from(self, onnx_path: Path) -> bytes:
        trt = self._trt
        what = str(self.model_path) + ("" if onnx_path == self.model_path else f" (converted to FP16 as {onnx_path})")
        builder = trt.Builder(self._logger)
        network = builder.create_network(_network_flags(trt))
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no error reported"]
            raise ModelFileError(f"TensorRT could not parse {what}: " + " | ".join(errors))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if self._static_batch is None:
            rest = tuple(int(d) for d in self.spec.input_shape[1:])  # type: ignore[arg-type]
            mn, opt, mx = self.profile
            profile = builder.create_optimization_profile()
            profile.set_shape(self.spec.input_name, (mn, *rest), (opt, *rest), (mx, *rest))
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ModelFileError(f"TensorRT failed to build an engine from {what}; see the TensorRT log")
        return bytes(plan)

    def _io_names(self) -> tuple[list[str], list[str]]:
        trt, eng = self._trt, self._engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [self.spec.input_name] or self.spec.output_name not in outputs:
            raise ModelFileError(
                f"TensorRT plan {self.plan_path} has inputs {inputs} / outputs {outputs}, expected "
                f"{self.spec.input_name!r} -> {self.spec.output_name!r}"
            )
        return inputs, outputs

    # ---- run -----------------------------------------------------------------------------

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self._in_dtype).contiguous()
        chunk = self._static_batch or self.profile[2]
        with torch.cuda.device(self.device):
            outs = [self._run_chunk(part.contiguous()) for part in x.split(chunk)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run_chunk(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self._static_batch and n < self._static_batch:
            pad = x.new_zeros((self._static_batch - n, *x.shape[1:]))
            x = torch.cat([x, pad])
        ctx = self._context
        if not ctx.set_input_shape(self.spec.input_name, tuple(x.shape)):
            raise InputImageError(
                f"{self.name}: TensorRT rejected input shape {tuple(x.shape)} (batch profile {self.profile})"
            )
        ctx.set_tensor_address(self.spec.input_name, x.data_ptr())
        buffers: dict[str, torch.Tensor] = {}
        for name, dtype in self._out_dtypes.items():
            buffers[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device=self.device)
            ctx.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.plan_path}")
        out = buffers[self.spec.output_name][:n]
        return out if out.dtype == torch.float32 else out.float()

    def describe(self) -> dict[str, str]:
        """Base description plus TensorRT version, GPU and plan path."""
        info = super().describe()
        info.update({"tensorrt": self.trt_version, "gpu": self.gpu, "plan": str(self.plan_path)})
        return info
