"""FP16 remainder of a QDQ INT8 ONNX for TensorRT's strongly typed builds (``--high_precision fp16``).

What the Q/DQ pairs do not make INT8 (biases, normalisation, residual adds, Softmax, the convolutions'
outputs) is stored and computed in FP16 instead of FP32, which is what NVIDIA ModelOpt's ONNX PTQ does
by default for TensorRT. A strongly typed network (TensorRT 10 with the flag, always in 11) runs each
layer in the dtype the graph gives it and inserts no casts, so the graph must be type-consistent:

* every FLOAT initializer and Constant becomes FLOAT16 (values beyond +-65504 clamped), every
  ``Cast(to=FLOAT)`` becomes ``Cast(to=FLOAT16)``, ``ConstantOfShape`` float values become FLOAT16;
* the Q/DQ scales become FLOAT16 with the data they scale: ONNX ``QuantizeLinear``-19 takes ``x`` and
  ``y_scale`` of one type, ``DequantizeLinear`` outputs its scale's type, and onnx-tensorrt's importer
  builds a strongly typed DQ with the scale's type as output and casts a Q's scale to its input type only
  below opset 19. FLOAT16 scales need opset 19, so the model is converted to opset 19 first;
* inputs the ONNX schema fixes to FLOAT (e.g. ``Resize`` scales) stay FLOAT, with a Cast when computed;
* the graph's inputs and outputs stay FLOAT32: one Cast after each input, one before each output, so
  callers and engines feed and read float32 as before.

The result is checked with ONNX's strict type inference before it is returned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelFileError
from .onnx_model import load_onnx, save_onnx, set_metadata

FP16_OPSET = 19  # first opset whose QuantizeLinear/DequantizeLinear take float16 scales
FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal float16, 6.1e-5
_DEFAULT = ("", "ai.onnx")
_FIXED_FLOAT = "tensor(float)"


@dataclass
class FP16Remainder:
    """What the conversion changed."""

    opset_from: int
    opset_to: int
    initializers: int = 0  # FLOAT initializers / Constant values converted
    kept_fp32: list[str] = field(default_factory=list)  # initializers a schema fixes to FLOAT
    clamped: list[str] = field(default_factory=list)  # tensors with finite values beyond +-65504
    subnormal_scales: list[str] = field(default_factory=list)  # Q/DQ scales below FP16's smallest normal
    casts: int = 0  # Cast nodes added (graph I/O and schema-fixed FLOAT inputs)

    def metadata(self) -> dict[str, object]:
        """``medptq.*`` keys recorded in a converted file."""
        meta: dict[str, object] = {"medptq.high_precision": "fp16", "medptq.fp16_casts": self.casts,
                                   "medptq.fp16_io": "float32 (Cast after inputs, before outputs)"}
        if self.opset_from != self.opset_to:
            meta["medptq.fp16_opset"] = f"{self.opset_from}->{self.opset_to}"
        if self.clamped:
            meta["medptq.fp16_clamped"] = ",".join(self.clamped)
        if self.subnormal_scales:
            meta["medptq.fp16_subnormal_scales"] = len(self.subnormal_scales)
        return meta


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in _DEFAULT), default=0)


def _has_fp16(model: onnx.ModelProto) -> bool:
    g = model.graph
    if any(t.data_type == TensorProto.FLOAT16 for t in g.initializer):
        return True
    return any(vi.type.tensor_type.elem_type == TensorProto.FLOAT16 for vi in (*g.input, *g.output, *g.value_info))


def _to_fp16(t: onnx.TensorProto, report: FP16Remainder) -> onnx.TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float64)
    finite = np.isfinite(arr)
    if np.any(np.abs(arr[finite]) > FP16_MAX):
        report.clamped.append(t.name)
        arr = np.where(finite, np.clip(arr, -FP16_MAX, FP16_MAX), arr)
    out = numpy_helper.from_array(arr.astype(np.float16), t.name)
    report.initializers += 1
    return out


def _fixed_float_inputs(node: onnx.NodeProto, opset: int) -> set[int]:
    """Input indices the node's ONNX schema types as plain FLOAT (no type variable)."""
    if node.domain not in _DEFAULT:
        return set()
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return set()
    fixed = set()
    for i in range(len(node.input)):
        if not schema.inputs:
            break
        formal = schema.inputs[min(i, len(schema.inputs) - 1)]
        if formal.type_str == _FIXED_FLOAT:
            fixed.add(i)
    return fixed


def convert_remainder_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FP16Remainder]:
    """FP16-remainder copy of the FP32-remainder QDQ (or plain FP32) ``model``; see the module doc."""
    if _has_fp16(model):
        raise ModelFileError("the model already holds float16 tensors; convert its FP32-remainder file")
    g = model.graph
    inits = {i.name for i in g.initializer}
    io = [vi for vi in (*g.input, *g.output) if vi.name not in inits]
    odd = [vi.name for vi in io if vi.type.tensor_type.elem_type != TensorProto.FLOAT]
    if odd:
        raise ModelFileError(f"graph inputs/outputs {odd} are not float32; the FP16 remainder keeps float32 I/O")
    before = _opset(model)
    if before < FP16_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, FP16_OPSET)
        except Exception as err:  # the converter raises bare RuntimeErrors/ValueErrors
            raise ModelFileError(f"cannot convert the model from opset {before} to {FP16_OPSET} "
                                 f"(needed for float16 Q/DQ scales): {err}") from err
    report = FP16Remainder(before, _opset(model))
    g = model.graph
    opset = report.opset_to

    # 1. which float constants must stay FLOAT (only read by schema-fixed FLOAT inputs)
    fixed_reads: dict[str, int] = {}
    reads: dict[str, int] = {}
    for node in g.node:
        fixed = _fixed_float_inputs(node, opset)
        for i, name in enumerate(node.input):
            if name:
                reads[name] = reads.get(name, 0) + 1
                if i in fixed:
                    fixed_reads[name] = fixed_reads.get(name, 0) + 1
    keep = {n for n, c in fixed_reads.items() if reads.get(n) == c}

    # 2. constants, Casts, ConstantOfShape
    new_inits = []
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT and t.name not in keep:
            new_inits.append(_to_fp16(t, report))
        else:
            if t.data_type == TensorProto.FLOAT:
                report.kept_fp32.append(t.name)
            new_inits.append(t)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    for node in g.node:
        if node.domain not in _DEFAULT:
            continue
        for a in node.attribute:
            if node.op_type == "Constant" and a.name == "value" and a.t.data_type == TensorProto.FLOAT \
                    and node.output[0] not in keep:
                a.t.CopyFrom(_to_fp16(a.t, report))
            elif node.op_type == "Constant" and a.name in ("value_float", "value_floats") \
                    and node.output[0] not in keep:
                arr = np.asarray(helper.get_attribute_value(a), np.float32)
                node.ClearField("attribute")
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr.astype(np.float16))))
                report.initializers += 1
                break
            elif node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
            elif node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_to_fp16(a.t, report))

    # 3. graph inputs and outputs stay float32 behind Casts
    taken = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    head: list[onnx.NodeProto] = []
    for vi in g.input:
        if vi.name in inits:
            continue
        inner = fresh(f"{vi.name}_fp16")
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == vi.name:
                    node.input[i] = inner
        head.append(helper.make_node("Cast", [vi.name], [inner], to=TensorProto.FLOAT16,
                                     name=fresh(f"{vi.name}/Cast_fp16")))
    tail: list[onnx.NodeProto] = []
    for vi in g.output:
        inner = fresh(f"{vi.name}_fp16")
        for node in g.node:
            for i, name in enumerate(node.output):
                if name == vi.name:
                    node.output[i] = inner
            for i, name in enumerate(node.input):
                if name == vi.name:
                    node.input[i] = inner
        tail.append(helper.make_node("Cast", [inner], [vi.name], to=TensorProto.FLOAT,
                                     name=fresh(f"{vi.name}/Cast_fp32")))
    report.casts += len(head) + len(tail)

    # 4. schema-fixed FLOAT inputs fed by a computed (now float16) tensor get a Cast back
    body: list[onnx.NodeProto] = []
    const_names = {t.name for t in g.initializer}
    for node in g.node:
        for i in sorted(_fixed_float_inputs(node, opset)):
            name = node.input[i]
            if not name or name in const_names or name in keep:
                continue
            back = fresh(f"{name}_fp32")
            body.append(helper.make_node("Cast", [name], [back], to=TensorProto.FLOAT, name=fresh(f"{name}/Cast_fp32")))
            node.input[i] = back
            report.casts += 1
        body.append(node)
    del g.node[:]
    g.node.extend(head + body + tail)
    del g.value_info[:]

    # 5. scales that FP16 stores only as subnormals (lose precision) or not at all (become 0)
    arrays = {t.name: t for t in g.initializer}
    scale_names = {n.input[1] for n in g.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1}
    for name in sorted(scale_names):
        t = arrays.get(name)
        if t is None or t.data_type != TensorProto.FLOAT16:
            continue
        s = numpy_helper.to_array(t)
        if np.any(s <= 0):
            raise ModelFileError(f"Q/DQ scale '{name}' underflows to 0 in float16 (smallest float32 value "
                                 "below 6e-8); keep this model's remainder in fp32")
        if np.any(s < FP16_TINY):
            report.subnormal_scales.append(name)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as err:  # InferenceError / ValidationError with the offending node
        raise ModelFileError(f"the FP16-remainder graph is not type-consistent: {err}") from err
    return model, report


def convert_remainder_fp16_file(src: str | os.PathLike, dst: str | os.PathLike) -> FP16Remainder:
    """Convert the ONNX file ``src`` and write ``dst`` (``onnx.checker``-checked, atomic; nothing on error)."""
    model, report = convert_remainder_fp16(load_onnx(src))
    set_metadata(model, report.metadata())
    save_onnx(model, Path(dst))
    return report
