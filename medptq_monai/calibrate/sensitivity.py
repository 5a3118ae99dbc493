"""Per-layer sensitivity: how much each quantized node alone degrades the output (SQNR, dB).

Ranges are calibrated once; then, for every quantizable node, a model with only that node
quantized runs on the evaluation patches with ONNX Runtime and its logits are compared with
FP32. The lowest-SQNR nodes are the candidates to keep in float (``exclude`` patterns).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import CalibrationError
from ..export.onnx_model import io_spec, load_onnx
from ..metrics import sqnr_db
from .calibrators import collect_ranges
from .quantize import QuantizeOptions, preprocess, select_nodes, write_qdq


def _outputs(model: Path | onnx.ModelProto, name: str, patches: Sequence[np.ndarray]) -> np.ndarray:
    data = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {name: p})[0] for p in patches])


def layer_sensitivity(
    fp32_path: str | os.PathLike, patches: Sequence[np.ndarray], options: QuantizeOptions | None = None,
    eval_patches: int = 4,
) -> dict:
    """``{"all": SQNR with every node quantized, "layers": [{"node", "op_type", "sqnr_db"}, ...]}``,
    layers sorted from most to least sensitive. ``patches`` calibrate; the first ``eval_patches`` evaluate."""
    options = options or QuantizeOptions()
    if not patches:
        raise CalibrationError("no calibration data: sensitivity analysis needs patches")
    spec = io_spec(load_onnx(fp32_path, load_weights=False))
    evaluation = [np.ascontiguousarray(p, np.float32) for p in patches[:eval_patches]]
    with tempfile.TemporaryDirectory(prefix="medptq-sens-") as work:
        work = Path(work)
        pre = work / "pre.onnx"
        model = preprocess(fp32_path, pre)
        op_type = {n.name: n.op_type for n in model.graph.node}
        chosen, excluded, tensors = select_nodes(model, options)
        ranges, _ = collect_ranges(pre, spec.input_name, patches, options.calibrator, tensors, work,
                                   percentile=options.percentile, max_pass_bytes=options.max_pass_bytes)
        reference = _outputs(pre, spec.input_name, evaluation)
        whole = _outputs(write_qdq(pre, ranges, options, chosen, excluded, work), spec.input_name, evaluation)
        layers = []
        for node in chosen:
            out = _outputs(write_qdq(pre, ranges, options, [node], [], work), spec.input_name, evaluation)
            layers.append({"node": node, "op_type": op_type[node], "sqnr_db": sqnr_db(reference, out)})
    layers.sort(key=lambda r: r["sqnr_db"])
    return {"all": sqnr_db(reference, whole), "layers": layers, "calibrator": options.calibrator}
