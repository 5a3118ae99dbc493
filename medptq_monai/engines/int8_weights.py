"""Saturation-safe weights for CPUs whose INT8 kernels sum u8·s8 pairs in 16 bits (see ``cpu_isa``)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

SAFE_LEVELS = 63  # 2 * 255 * 63 = 32130 <= 32767: no 16-bit pair sum can saturate


def requantize_weights_7bit(model: onnx.ModelProto, levels: int = SAFE_LEVELS) -> int:
    """Rewrite ``model`` in place so every int8 weight feeding a DequantizeLinear has ``|q| <= levels``.

    Per channel (the DQ's ``axis``) or per tensor, a weight whose largest ``|q|`` exceeds ``levels``
    gets ``q' = round(q * levels / max|q|)`` and ``scale' = scale * max|q| / levels``, so it keeps
    its float range and loses one bit of resolution; channels already within ``levels`` are
    unchanged. Only symmetric weights (zero point absent or 0) are touched. New initializers are
    written under new names, so a scale shared by several DequantizeLinear nodes stays correct.
    Returns how many weights were requantized.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    done: dict[tuple[str, str], tuple[str, str]] = {}
    changed = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[1] not in inits:
            continue
        q = numpy_helper.to_array(inits[node.input[0]])
        if q.dtype != np.int8:
            continue
        if len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is None or np.any(numpy_helper.to_array(zp)):
                continue
        key = (node.input[0], node.input[1])
        if key not in done:
            scale = numpy_helper.to_array(inits[node.input[1]])
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
            new = _requantized(q, scale, axis % q.ndim if q.ndim else 0, levels)
            if new is None:
                done[key] = key
                continue
            q_name, s_name = f"{node.input[0]}_7bit", f"{node.input[1]}_7bit_{node.input[0]}"
            graph.initializer.extend([numpy_helper.from_array(new[0], q_name), numpy_helper.from_array(new[1], s_name)])
            done[key] = (q_name, s_name)
            changed += 1
        node.input[0], node.input[1] = done[key]
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return changed


def _requantized(q: np.ndarray, scale: np.ndarray, axis: int, levels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(q', scale') with ``|q'| <= levels``, or None when ``q`` already fits."""
    mag = np.abs(q.astype(np.int32))
    if scale.ndim == 0 or scale.size == 1:
        top = np.asarray(max(int(mag.max(initial=0)), 1), dtype=np.float64)
        factor = np.maximum(top / levels, 1.0)
        shaped = factor
    else:
        reduce = tuple(i for i in range(q.ndim) if i != axis)
        top = np.maximum(mag.max(axis=reduce), 1).astype(np.float64)
        factor = np.maximum(top / levels, 1.0)
        shape = [1] * q.ndim
        shape[axis] = -1
        shaped = factor.reshape(shape)
    if np.all(factor == 1.0):
        return None
    q_new = np.clip(np.round(q / shaped), -levels, levels).astype(np.int8)
    s_new = (scale.astype(np.float64) * factor.reshape(scale.shape)).astype(scale.dtype)
    return q_new, s_new
