"""Static checks of a QDQ ONNX graph against TensorRT's explicit-quantization (INT8) rules.

TensorRT builds INT8 engines only from explicit Q/DQ graphs. These checks run without TensorRT
and cover the main graph only, not the subgraphs of If/Loop nodes. Each rule names its source:

- [PARSER10] onnx/onnx-tensorrt ``onnxOpImporters.cpp`` (commit dd0a3a9f, the TensorRT 10.x ONNX
  parser), ``QuantDequantLinearHelper``: scales must be constant and > 0, zero points zero, the
  zero point optional (two inputs suffice), a Q without zero point quantizes to INT8 (ONNX: UINT8),
  per-channel scales 1-D with one value per element of ``axis``, ``axis`` read as ONNX's default 1
  when absent (0 for opset < 13).
- [PARSER8] onnx/onnx-tensorrt ``builtin_op_importers.cpp`` of the TensorRT 8.x releases: the same
  helper required all three inputs and read an absent ``axis`` of a per-channel Q/DQ as 0.
- [OPS] onnx/onnx-tensorrt ``docs/operators.md``: the TensorRT 10.0 parser documents opsets 9 to 20
  inclusive (TensorRT 10.15: 9 to 24); QuantizeLinear/DequantizeLinear: INT8, zero point zero.
- [HEADER] TensorRT ``NvInfer.h`` ``IQuantizeLayer``/``IDequantizeLayer``: zeroPt optional and then
  taken as zero, only zeros allowed; scale a scalar (per tensor) or 1-D (per channel); activations
  per tensor.
- [DECONV] ConvTranspose weights: NVIDIA's public sources disagree on the per-channel axis
  (axis 0 = input channels of the ``(Cin, Cout/group, k...)`` weight in NVIDIA/TensorRT#2380 and
  ModelOpt's torch descriptors; axis 1 in ModelOpt's ONNX PTQ), so only a per-tensor scale is
  unambiguous; that is what ``calibrate.quantize.write_qdq`` writes.
- [TYPED] Strongly typed networks (TensorRT 10 with ``STRONGLY_TYPED``, always in 11) take every tensor's
  dtype from the graph and insert no casts. onnx/onnx-tensorrt ``onnxOpImporters.cpp``
  ``QuantDequantLinearHelper`` (main, commit 0137504e): FP16/BF16 scales are read; a strongly typed DQ
  outputs its scale's type; a Q's scale is cast to the input type only below opset 19. ONNX operator
  specs: ``QuantizeLinear``/``DequantizeLinear``-13 take FLOAT scales only, -19 add FLOAT16 with ``x`` and
  ``y_scale`` of one type (Q) and the output of the scale's type (DQ); inputs of an op that share a type
  variable (``T``) must share a dtype. These dtype rules run only on graphs that hold FLOAT16/BFLOAT16
  tensors (the ``--high_precision fp16`` files); an all-FP32 graph cannot break them.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import QDQCompatibilityError
from .onnx_model import load_onnx

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
# [OPS] + per-channel Q/DQ: the ``axis`` attribute exists from opset 13; TensorRT 10.0's parser documents
# opsets up to 20 (10.15: up to 24), so 13..20 is read by every TensorRT 10.x parser.
MIN_OPSET, MAX_OPSET = 13, 20
_DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@dataclass(frozen=True)
class QDQIssue:
    """One broken rule at one node (graph-level issues use the node name ``<graph>``)."""

    node: str
    op_type: str
    message: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.message}"


@dataclass(frozen=True)
class _Const:
    value: np.ndarray | None  # None: the data could not be read (e.g. external data not loaded)
    dtype: int  # TensorProto element type
    dims: tuple[int, ...]


class _Graph:
    """Index of a graph: constants, producers, consumers and known element types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.nodes = list(g.node)
        self.consts: dict[str, _Const] = {}
        for init in g.initializer:
            self.consts[init.name] = _const_from_tensor(init)
        for node in self.nodes:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
                const = _const_from_constant_node(node)
                if const is not None:
                    self.consts[node.output[0]] = const
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for idx, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, idx))
        self.graph_outputs = {o.name for o in g.output}
        self.elem_type: dict[str, int] = {
            vi.name: vi.type.tensor_type.elem_type
            for vi in (*g.input, *g.value_info, *g.output)
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type
        }
        for node in self.nodes:  # a Q's output has its zero point's type (uint8 when omitted)
            if node.op_type == _Q and node.output:
                zp = self.consts.get(_input(node, 2))
                out_dtype = _attr(node, "output_dtype", 0) or TensorProto.UINT8
                self.elem_type[node.output[0]] = zp.dtype if zp is not None else out_dtype

    def is_weight(self, node: onnx.NodeProto) -> bool:
        """A Q/DQ on a constant, or a DQ fed by a Q of a constant (float weights kept as Q→DQ)."""
        src = _input(node, 0)
        if src in self.consts:
            return True
        prod = self.producer.get(src)
        return node.op_type == _DQ and prod is not None and prod.op_type == _Q and _input(prod, 0) in self.consts

    def weight_dims(self, node: onnx.NodeProto) -> tuple[int, ...] | None:
        src = _input(node, 0)
        if src not in self.consts:
            prod = self.producer.get(src)
            src = _input(prod, 0) if prod is not None else ""
        const = self.consts.get(src)
        return const.dims if const is not None else None


def _const_from_tensor(t: onnx.TensorProto) -> _Const:
    try:
        value: np.ndarray | None = numpy_helper.to_array(t)
    except Exception:  # external data not loaded, malformed raw_data, ...
        value = None
    return _Const(value, t.data_type, tuple(int(d) for d in t.dims))


def _const_from_constant_node(node: onnx.NodeProto) -> _Const | None:
    for a in node.attribute:
        if a.name == "value":
            return _const_from_tensor(a.t)
        if a.name in ("value_float", "value_floats"):
            arr = np.asarray(onnx.helper.get_attribute_value(a), dtype=np.float32)
            return _Const(arr, TensorProto.FLOAT, arr.shape)
        if a.name in ("value_int", "value_ints"):
            arr = np.asarray(onnx.helper.get_attribute_value(a), dtype=np.int64)
            return _Const(arr, TensorProto.INT64, arr.shape)
    return None


def _input(node: onnx.NodeProto, idx: int) -> str:
    return node.input[idx] if len(node.input) > idx else ""


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(onnx.helper.get_attribute_value(a))
    return default


def _name(node: onnx.NodeProto, index: int) -> str:
    return node.name or (f"<{node.output[0]}>" if node.output else f"<{node.op_type} #{index}>")


def _type_name(dtype: int) -> str:
    try:
        return TensorProto.DataType.Name(dtype)
    except ValueError:
        return f"type {dtype}"


def _as_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_onnx(model)


def _expected_weight_axis(consumer: onnx.NodeProto, idx: int, rank: int) -> int | None:
    """Output-channel axis TensorRT needs for a per-channel weight, or None when there is no rule
    (ConvTranspose weights have their own rule: per tensor only, see [DECONV])."""
    if consumer.op_type == "Conv" and idx == 1:
        return 0
    if consumer.op_type == "MatMul" and idx == 1:
        return rank - 1
    if consumer.op_type == "Gemm" and idx == 1:
        return 0 if _attr(consumer, "transB", 0) else 1
    return None


def _check_zero_point(g: _Graph, node: onnx.NodeProto, scale: np.ndarray | None) -> list[str]:
    zp_name = _input(node, 2)
    if not zp_name:
        if node.op_type == _DQ:
            # [PARSER10]/[HEADER]: an absent zero point is taken as 0, which is also ONNX's meaning for an
            # int8 input; the input's type is checked in _node_issues. ([PARSER8] still required it.)
            return []
        if _attr(node, "output_dtype", 0) == TensorProto.INT8:
            return []  # opset 21+: ONNX and TensorRT both quantize to int8 with zero point 0
        # [PARSER10]: TensorRT quantizes to INT8 here while ONNX (and every CPU runtime) quantizes to UINT8.
        return ["no zero point and no output_dtype: ONNX quantizes to UINT8, TensorRT to INT8; "
                "give an INT8 zero point of 0"]
    zp = g.consts.get(zp_name)
    if zp is None:
        return [f"zero point '{zp_name}' is not a constant"]
    out = []
    if zp.dtype != TensorProto.INT8:
        out.append(f"zero point '{zp_name}' is {_type_name(zp.dtype)}, TensorRT int8 needs INT8")
    if zp.value is None:
        out.append(f"zero point '{zp_name}' cannot be read")
    else:
        if np.any(zp.value != 0):
            out.append(f"zero point '{zp_name}' is nonzero (TensorRT needs symmetric quantization, zero point 0)")
        if scale is not None and zp.value.shape != scale.shape:
            out.append(f"zero point shape {zp.value.shape} differs from scale shape {scale.shape}")
    return out


def _check_scale(g: _Graph, node: onnx.NodeProto) -> tuple[np.ndarray | None, list[str]]:
    scale_name = _input(node, 1)
    const = g.consts.get(scale_name)
    if const is None:
        return None, [f"scale '{scale_name}' is not a constant (initializer or Constant node)"]
    if const.value is None:
        return None, [f"scale '{scale_name}' cannot be read"]
    scale = const.value
    out = []
    if scale.ndim > 1:
        out.append(f"scale '{scale_name}' has rank {scale.ndim}; TensorRT int8 needs a scalar or 1-D scale")
    vals = scale.astype(np.float64, copy=False)
    if not np.all(np.isfinite(vals)):
        out.append(f"scale '{scale_name}' holds non-finite values")
    elif np.any(vals <= 0):
        out.append(f"scale '{scale_name}' holds non-positive values (min {vals.min():g})")
    return scale, out


def _check_weight_layout(g: _Graph, node: onnx.NodeProto, scale: np.ndarray) -> list[str]:
    dims = g.weight_dims(node)
    if scale.size <= 1 or dims is None:  # per-tensor weights are allowed
        return []
    rank = len(dims)
    axis = _attr(node, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank:
        return [f"axis {_attr(node, 'axis', 1)} is out of range for weight shape {dims}"]
    out = []
    if scale.ndim == 1 and scale.size != dims[axis]:
        out.append(f"per-channel scale length {scale.size} != weight shape {dims}[{axis}] = {dims[axis]}")
    if node.op_type == _Q:  # consumers are checked on the DQ that follows
        return out
    for consumer, idx in g.consumers.get(node.output[0] if node.output else "", []):
        if consumer.op_type == "ConvTranspose" and idx == 1:  # [DECONV]
            out.append(
                f"per-channel (axis {axis}) weight {dims} of ConvTranspose '{consumer.name}': TensorRT's axis for "
                "ConvTranspose weights is not settled (axis 0: NVIDIA/TensorRT#2380; axis 1: ModelOpt ONNX PTQ); "
                "use a per-tensor scale"
            )
            continue
        want = _expected_weight_axis(consumer, idx, rank)
        if want is None:
            continue
        if axis != want:
            out.append(
                f"per-channel axis {axis} for weight {dims} of {consumer.op_type} '{consumer.name}', "
                f"TensorRT needs axis {want} (output channels)"
            )
    return out


def _node_issues(g: _Graph, node: onnx.NodeProto) -> list[str]:
    msgs: list[str] = []
    if node.domain not in _DEFAULT_DOMAINS:
        msgs.append(f"{node.op_type} in domain '{node.domain}'; TensorRT parses only the default ONNX domain")
    if _attr(node, "block_size", 0) != 0:
        msgs.append(f"blockwise quantization (block_size={_attr(node, 'block_size', 0)}) is not supported for int8")
    scale, scale_msgs = _check_scale(g, node)
    msgs += scale_msgs
    msgs += _check_zero_point(g, node, scale)
    if scale is not None and scale.size > 1 and not any(a.name == "axis" for a in node.attribute):
        # [PARSER8] reads an absent axis of a per-channel Q/DQ as 0, [PARSER10] as ONNX's default 1.
        msgs.append(f"per-channel scale ({scale.size} values) without an explicit axis attribute "
                    "(TensorRT 8.x parsers read it as 0, 10.x as 1)")
    weight = g.is_weight(node)
    src = _input(node, 0)
    if node.op_type == _DQ:
        src_type = g.consts[src].dtype if src in g.consts else g.elem_type.get(src)
        if src_type == TensorProto.INT32:
            msgs.append(f"input '{src}' is INT32 (quantized bias); TensorRT does not support int32 DQ, keep bias float")
        elif src in g.consts and src_type != TensorProto.INT8:
            msgs.append(f"weight initializer '{src}' is {_type_name(src_type or 0)}, TensorRT int8 needs INT8")
        elif src_type == TensorProto.UINT8 and not _input(node, 2):
            # [PARSER10] rejects UINT8 DQ inputs (DLA-only flag); with a zero point the zero point is flagged
            msgs.append(f"input '{src}' is UINT8 (a QuantizeLinear without zero point); TensorRT needs INT8")
    if weight:
        if scale is not None:
            msgs += _check_weight_layout(g, node, scale)
    elif scale is not None and scale.size > 1:
        msgs.append(f"activation scale has {scale.size} values; TensorRT needs per-tensor (scalar) activation scales")
    if node.op_type == _Q and node.output:
        out = node.output[0]
        bad = [c for c, _ in g.consumers.get(out, []) if c.op_type != _DQ]
        if bad or out in g.graph_outputs or not g.consumers.get(out):
            what = ", ".join(f"{c.op_type} '{c.name}'" for c in bad) or "nothing / a graph output"
            msgs.append(f"output feeds {what}; TensorRT needs every QuantizeLinear followed by DequantizeLinear")
    return msgs


_REDUCED_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _has_reduced_float(model: onnx.ModelProto) -> bool:
    g = model.graph
    if any(t.data_type in _REDUCED_FLOATS for t in g.initializer):
        return True
    for node in g.node:
        for a in node.attribute:
            if (a.name == "to" and node.op_type == "Cast" and a.i in _REDUCED_FLOATS) or (
                    a.type == onnx.AttributeProto.TENSOR and a.t.data_type in _REDUCED_FLOATS):
                return True
    return any(vi.type.tensor_type.elem_type in _REDUCED_FLOATS for vi in (*g.input, *g.output, *g.value_info))


def _inferred_types(model: onnx.ModelProto, g: _Graph) -> dict[str, int]:
    """Element type of every tensor ONNX's (non-strict) type inference can tell, plus constants."""
    types = dict(g.elem_type)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph inference cannot read at all: use what the file says
        inferred = model
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    for name, const in g.consts.items():
        types[name] = const.dtype
    return types


_TYPE_STR = {TensorProto.FLOAT: "tensor(float)", TensorProto.FLOAT16: "tensor(float16)",
             TensorProto.BFLOAT16: "tensor(bfloat16)", TensorProto.DOUBLE: "tensor(double)"}


def _node_dtype_issues(node: onnx.NodeProto, schema: onnx.defs.OpSchema, types: dict[str, int], g: _Graph,
                       opset: int) -> list[str]:
    if node.op_type in (_Q, _DQ) and opset < 19:
        reduced = [n for n in node.input[:2] if types.get(n) in _REDUCED_FLOATS]
        if reduced:
            return [f"float16/bfloat16 {reduced} at opset {opset}: {node.op_type} takes float16/bfloat16 data and "
                    "scales from opset 19 (ONNX spec)"]
        return []
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for idx, name in enumerate(node.input):
        dtype = types.get(name) if name else None
        if dtype in _FLOAT_TYPES:
            groups[schema.inputs[min(idx, len(schema.inputs) - 1)].type_str].append((name, dtype))
    msgs = []
    for type_str, entries in groups.items():
        what = ", ".join(f"'{n}' {_type_name(d)}" for n, d in entries)
        if type_str not in allowed:  # a fixed type such as tensor(float)
            if any(_TYPE_STR[d] != type_str for _, d in entries):
                msgs.append(f"input {what} where the ONNX schema needs {type_str}; add a Cast")
            continue
        bad = [n for n, d in entries if _TYPE_STR[d] not in allowed[type_str]]
        if bad:
            msgs.append(f"{bad} of a type {type_str} does not allow at opset {opset}")
        if len({d for _, d in entries}) > 1:
            if node.op_type == _Q:
                msgs.append(f"scale and input dtypes differ ({what}): a strongly typed TensorRT Q needs the scale "
                            "in the input's type (its parser casts the scale only below opset 19)")
            else:
                msgs.append(f"inputs {what} share type {type_str} but mix dtypes: a strongly typed TensorRT "
                            "network inserts no casts; add a Cast")
    return msgs


def _dtype_issues(model: onnx.ModelProto, g: _Graph, opset: int) -> list[QDQIssue]:
    """[TYPED]: dtype consistency of a graph with FLOAT16/BFLOAT16 tensors, node by node."""
    if not _has_reduced_float(model):
        return []
    types = _inferred_types(model, g)
    issues: list[QDQIssue] = []
    for i, node in enumerate(g.nodes):
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            continue
        if schema.inputs:
            issues += [QDQIssue(_name(node, i), node.op_type, m)
                       for m in _node_dtype_issues(node, schema, types, g, opset)]
    return issues


def check_qdq_for_tensorrt(model: onnx.ModelProto | str | os.PathLike) -> list[QDQIssue]:
    """Every node of a QDQ ONNX graph that breaks TensorRT's explicit int8 quantization rules
    (and, for graphs with FLOAT16 tensors, the strongly typed dtype rules)."""
    model = _as_model(model)
    g = _Graph(model)
    issues: list[QDQIssue] = []
    qdq = [(i, n) for i, n in enumerate(g.nodes) if n.op_type in (_Q, _DQ)]
    opset = max((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), default=0)
    if qdq and opset < MIN_OPSET:
        msg = f"default-domain opset {opset} < {MIN_OPSET}; per-channel Q/DQ (the axis attribute) needs {MIN_OPSET}"
        issues.append(QDQIssue("<graph>", "opset_import", msg))
    elif opset > MAX_OPSET:
        msg = (f"default-domain opset {opset} > {MAX_OPSET}, the highest opset TensorRT 10.0's ONNX parser "
               f"supports (onnx-tensorrt docs/operators.md)")
        issues.append(QDQIssue("<graph>", "opset_import", msg))
    for i, node in qdq:
        issues += [QDQIssue(_name(node, i), node.op_type, m) for m in _node_issues(g, node)]
    issues += _dtype_issues(model, g, opset)
    return issues


def assert_tensorrt_compatible(model: onnx.ModelProto | str | os.PathLike, name: str = "model") -> None:
    """Raise ``QDQCompatibilityError`` listing every issue (one per line) when the graph breaks a rule."""
    issues = check_qdq_for_tensorrt(model)
    if issues:
        lines = "\n".join(f"  - {issue}" for issue in issues)
        raise QDQCompatibilityError(f"{name}: {len(issues)} TensorRT QDQ issue(s):\n{lines}")


def count_float_weight_qdq(model: onnx.ModelProto | str | os.PathLike) -> int:
    """QuantizeLinear nodes quantizing a float constant (weights kept FP32 as Q→DQ; not compacted)."""
    g = _Graph(_as_model(model))
    return sum(
        1
        for n in g.nodes
        if n.op_type == _Q and _input(n, 0) in g.consts and g.consts[_input(n, 0)].dtype in _FLOAT_TYPES
    )


def qdq_summary(model: onnx.ModelProto | str | os.PathLike) -> dict:
    """Counts of Q/DQ nodes, int8 weight initializers, per-channel weight DQs, per-tensor activation Qs
    and ``quantized_ops`` (op type → nodes with at least one DequantizeLinear input)."""
    g = _Graph(_as_model(model))
    q = [n for n in g.nodes if n.op_type == _Q]
    dq = [n for n in g.nodes if n.op_type == _DQ]

    def scale_size(n: onnx.NodeProto) -> int:
        c = g.consts.get(_input(n, 1))
        return int(c.value.size) if c is not None and c.value is not None else 0

    int8_weights = {
        _input(n, 0) for n in dq if _input(n, 0) in g.consts and g.consts[_input(n, 0)].dtype == TensorProto.INT8
    }
    dq_outputs = {o for n in dq for o in n.output}
    quantized = Counter(
        n.op_type for n in g.nodes if n.op_type not in (_Q, _DQ) and any(i in dq_outputs for i in n.input)
    )
    return {
        "quantize_linear": len(q),
        "dequantize_linear": len(dq),
        "int8_weight_initializers": len(int8_weights),
        "per_channel_weight_dq": sum(1 for n in dq if g.is_weight(n) and scale_size(n) > 1),
        "per_tensor_activation_q": sum(1 for n in q if not g.is_weight(n) and scale_size(n) == 1),
        "quantized_ops": dict(sorted(quantized.items())),
    }
