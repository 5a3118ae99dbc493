"""Loading ONNX files safely, reading their I/O signature, and writing metadata."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import ModelFileError
from ..fileio import atomic_path


@dataclass(frozen=True)
class IOSpec:
    """Name and shape of a model's single image input and logits output (``None`` = dynamic axis)."""

    input_name: str
    input_shape: tuple[int | None, ...]
    output_name: str
    output_shape: tuple[int | None, ...]

    @property
    def in_channels(self) -> int | None:
        return self.input_shape[1] if len(self.input_shape) > 1 else None

    @property
    def num_classes(self) -> int | None:
        return self.output_shape[1] if len(self.output_shape) > 1 else None

    @property
    def spatial_shape(self) -> tuple[int | None, ...]:
        return tuple(self.input_shape[2:])

    def check_bundle(
        self, where: object, in_channels: int | None, num_classes: int | None, roi_size: Sequence[int] | None
    ) -> None:
        """Raise ``ModelFileError`` if the model's channels, classes or static patch shape disagree
        with the bundle metadata (``None`` on either side is not checked)."""
        if in_channels is not None and self.in_channels is not None and self.in_channels != int(in_channels):
            raise ModelFileError(
                f"{where}: the model takes {self.in_channels} input channel(s) but the bundle metadata says {in_channels}"
            )
        if num_classes is not None and self.num_classes is not None and self.num_classes != int(num_classes):
            raise ModelFileError(
                f"{where}: the model outputs {self.num_classes} classes but the bundle metadata says {num_classes}"
            )
        if roi_size is not None and all(d is not None for d in self.spatial_shape):
            if tuple(self.spatial_shape) != tuple(int(r) for r in roi_size):
                raise ModelFileError(
                    f"{where}: the model takes patches of {tuple(self.spatial_shape)} but the bundle roi is "
                    f"{tuple(roi_size)}; set the inferer roi to the model's patch shape or re-export"
                )


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)


def load_onnx(path: str | os.PathLike, load_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX file; missing, empty or corrupt files raise ``ModelFileError``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"ONNX model not found: {path}")
    if path.stat().st_size == 0:
        raise ModelFileError(f"ONNX model is empty (0 bytes): {path}")
    try:
        model = onnx.load(str(path), load_external_data=load_weights)
    except Exception as err:  # protobuf DecodeError and friends
        raise ModelFileError(f"corrupt ONNX model {path}: {err}") from err
    if not model.graph.node:
        raise ModelFileError(f"ONNX model {path} has no graph nodes (corrupt or not a model)")
    return model


def io_spec(model: onnx.ModelProto | str | os.PathLike) -> IOSpec:
    """The single input and first output of a segmentation model."""
    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model, load_weights=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelFileError(f"expected one image input, the model has {[i.name for i in inputs]}")
    if not model.graph.output:
        raise ModelFileError("the model has no output")
    out = model.graph.output[0]
    return IOSpec(inputs[0].name, _dims(inputs[0]), out.name, _dims(out))


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: onnx.ModelProto, values: dict[str, object]) -> None:
    """Add or replace ``metadata_props`` entries (values stored as strings)."""
    current = metadata(model)
    current.update({k: str(v) for k, v in values.items()})
    del model.metadata_props[:]
    for key in sorted(current):
        model.metadata_props.add(key=key, value=current[key])


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, check: bool = True) -> Path:
    """Validate with ``onnx.checker`` and write atomically."""
    if check:
        onnx.checker.check_model(model)
    path = Path(path)
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
    return path


def drop_unused(model: onnx.ModelProto) -> None:
    """Remove, in place, nodes whose outputs nothing reads (graph outputs count) and unread initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
