"""ONNX Runtime INT8 vs FP32 per patch, before and after the ORT-specific copy (issue 9 point 4):
reports/ort_int8.{json,md}.

Per model (a folder with ``model.onnx``, ``model_int8.onnx`` and ``patch.npy``, or made here by ``--prepare``):
ONNX Runtime FP32, ONNX Runtime INT8 on the file as written ("before": a plain session, what the engine
loaded until now), ONNX Runtime INT8 through ``OnnxRuntimeEngine`` ("after": the ``ort_fused`` copy) and
OpenVINO INT8, timed interleaved (each round all four, in a seeded random order) so that load from other
processes hits every variant alike; medians, minima and the median of per-round ratios. SQNR of each
INT8 output vs the ONNX Runtime FP32 output. Then one profiled run per ONNX Runtime variant: kernel time
per op type, and what ONNX Runtime's optimized graph contains (QLinearConv, DequantizeLinear left, ...).
``--micro`` adds the 3-D Conv shapes that set ``ort_fused.MIN_CHANNELS`` (float Conv vs QLinearConv vs
ConvInteger, min of N).

    python scripts/ort_int8_speed.py --prepare unet_int8,segresnet_int8:small,nnunet_int8:small --micro
    python scripts/ort_int8_speed.py --model unet=/tmp/work/unet_int8_full [--repeats 7]
    python scripts/ort_int8_speed.py            # re-render reports/ort_int8.md from reports/ort_int8.json

A run replaces the rows of the models it measures and keeps the others (and the micro table unless ``--micro``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from medptq_monai.engines.onnxruntime_engine import OnnxRuntimeEngine, cpu_int8_copy
from medptq_monai.engines.openvino_engine import OpenVinoEngine
from medptq_monai.fileio import relative_paths, write_text_atomic
from medptq_monai.machine import machine_info, machine_line
from medptq_monai.metrics import sqnr_db

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "totalseg_ct"
THREADS = 2


def prepare(spec: str, bundles: Path, work: Path) -> Path:
    """``NAME`` (full-size default, the bundle's weights or seeded random ones, 2 calibration patches as in
    ``medptq bench --quick``) or ``NAME:small`` (the small demo model, its own calibration): a folder with
    both ONNX files and one real CT patch at the bundle's roi, in ``work`` (the bundle is copied there)."""
    from medptq_monai.benchmark import run_calibration
    from medptq_monai.benchmark_suite import _real_patch, _weights
    from medptq_monai.bundle.runner import bundle_parser

    name, _, kind = spec.partition(":")
    out = work / f"{name}_{kind or 'full'}"
    if (out / "models" / "model_int8.onnx").is_file() and (out / "patch.npy").is_file():
        return out
    bundle = out / "bundle"
    if not bundle.exists():
        shutil.copytree(bundles / name, bundle, ignore=shutil.ignore_patterns("*.onnx", "eval", ".cache"))
    configs = ["inference.json"] + (["small.json"] if kind == "small" else [])
    parser = bundle_parser(bundle, configs)
    roi = [int(r) for r in parser.get_parsed_content("roi_size")]
    overrides = {"models_dir": str(out / "models")}
    if kind == "small":  # ``medptq quantize`` with the small overlay and the small checkpoint
        overrides["config_file"] = json.dumps([str(bundle / "configs" / c) for c in configs])
        overrides["checkpoint"] = str(parser.get_parsed_content("checkpoint"))
        run_calibration(bundle, DATA / "calibration", None, overrides=overrides)
    else:
        torch.manual_seed(0)
        net = parser.get_parsed_content("network_def", lazy=False)
        overrides["checkpoint"] = str(_weights(net, bundle, out)[0])
        del net
        run_calibration(bundle, DATA / "calibration", 2, overrides=overrides)
    np.save(out / "patch.npy", _real_patch(parser, DATA, roi).numpy())
    return out


def _models(folder: Path) -> tuple[Path, Path]:
    base = folder / "models" if (folder / "models" / "model.onnx").is_file() else folder
    return base / "model.onnx", base / "model_int8.onnx"


def _session(source: str | bytes, profile: str | None = None, saved: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    if saved:
        options.optimized_model_filepath = saved
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _profile(source: str | bytes, x: np.ndarray, tmp: Path, tag: str) -> dict[str, Any]:
    """Kernel ms per op type of one run after a warm-up, and the op types of ORT's optimized graph."""
    saved = tmp / f"{tag}_optimized.onnx"
    session = _session(source, profile=str(tmp / tag), saved=str(saved))
    name = session.get_inputs()[0].name
    session.run(None, {name: x})
    session.run(None, {name: x})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    per_node: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1e3 / 2  # two runs profiled
            per_node[event["name"].removesuffix("_kernel_time")] += event["dur"] / 1e3 / 2
    graph = Counter(n.op_type for n in onnx.load(str(saved)).graph.node)
    return {"kernel_ms": dict(sorted(per_op.items(), key=lambda kv: -kv[1])), "optimized_ops": dict(graph),
            "node_ms": dict(per_node)}


def conv_classes(int8: onnx.ModelProto, copy: onnx.ModelProto) -> dict[str, str]:
    """What the INT8 file lets ONNX Runtime do with each convolution (by node name): ``fused`` (a QLinearConv
    in the copy), ``float layer`` (no Q/DQ on its input), ``ConvTranspose`` (no integer kernel in ORT's CPU
    provider), ``float output`` (read by a normalization, Add, Concat, ...: needs an output quantizer the file
    does not have), ``few channels`` (Relu → Q, but under ``MIN_CHANNELS``)."""
    def maps(model: onnx.ModelProto) -> tuple[dict, dict]:
        producer = {o: n for n in model.graph.node for o in n.output}
        readers: dict[str, list] = defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                readers[i].append(n)
        return producer, readers

    producer, _ = maps(int8)
    copy_producer, copy_readers = maps(copy)
    classes = {}
    for node in copy.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        src = producer.get(node.input[0])
        out = copy_readers.get(node.output[0], [])
        dq = copy_producer.get(node.input[0])
        if src is None or src.op_type != "DequantizeLinear":
            classes[node.name] = "float layer"
        elif node.op_type == "ConvTranspose":
            classes[node.name] = "ConvTranspose"
        elif len(out) == 1 and out[0].op_type == "QuantizeLinear" and dq is not None \
                and dq.op_type == "DequantizeLinear":
            classes[node.name] = "fused"
        elif len(out) == 1 and out[0].op_type == "Relu" and [r.op_type for r in copy_readers[out[0].output[0]]] \
                == ["QuantizeLinear"]:
            classes[node.name] = "few channels"
        else:
            classes[node.name] = "float output"
    return classes


def fp32_time_by_class(profile: dict[str, Any], classes: dict[str, str]) -> dict[str, float]:
    """ORT FP32 kernel ms per convolution class (``conv_classes``; FP32 nodes keep the convolution's name
    through ORT's Conv+Relu and ConvTranspose+BatchNorm fusions) and for all other ops."""
    out: dict[str, float] = defaultdict(float)
    for node, ms in profile["node_ms"].items():
        out[classes.get(node, "other ops")] += ms
    return dict(out)


def measure(name: str, folder: Path, repeats: int, tmp: Path) -> dict[str, Any]:
    """One model's row (see the module docstring)."""
    fp32, int8 = _models(folder)
    x = np.load(folder / "patch.npy").astype(np.float32)
    x = x[None] if x.ndim == 4 else x
    engine = OnnxRuntimeEngine(int8, "int8", threads=THREADS)
    openvino = OpenVinoEngine(int8, "int8", threads=THREADS)
    plain = {"fp32": _session(str(fp32)), "int8_file": _session(str(int8))}
    input_name = plain["fp32"].get_inputs()[0].name
    xt = torch.from_numpy(x)
    calls = {
        "ort_fp32": lambda: plain["fp32"].run(None, {input_name: x})[0],
        "ort_int8_file": lambda: plain["int8_file"].run(None, {input_name: x})[0],
        "ort_int8_fused": lambda: engine(xt).numpy(),
        "openvino_int8": lambda: openvino(xt).numpy(),
    }
    outputs = {key: call() for key, call in calls.items()}  # warm-up, and the outputs compared
    times: dict[str, list[float]] = {key: [] for key in calls}
    cpu: dict[str, list[float]] = {key: [] for key in calls}  # process CPU time: less sensitive to other load
    load = [os.getloadavg()[0]]
    order = random.Random(0)  # a new seeded order each round: no variant always follows the same one
    for _ in range(repeats):
        keys = list(calls)
        order.shuffle(keys)
        for key in keys:
            call = calls[key]
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            times[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
        load.append(os.getloadavg()[0])
    ref = outputs["ort_fp32"]
    ms = {k: float(np.median(v) * 1e3) for k, v in times.items()}
    paired = {k: float(np.median(np.array(times["ort_fp32"]) / np.array(v))) for k, v in times.items()}
    proto = onnx.load(str(int8))
    copy = cpu_int8_copy(proto, engine.isa)  # the graph the engine runs, for the profile
    classes = conv_classes(onnx.load(str(int8)), proto)
    profiles = {"ort_fp32": _profile(str(fp32), x, tmp, f"{name}_fp32"),
                "ort_int8_file": _profile(str(int8), x, tmp, f"{name}_int8"),
                "ort_int8_fused": _profile(proto.SerializeToString(), x, tmp, f"{name}_fused")}
    return {
        "model": name, "folder": str(folder), "input_shape": list(x.shape),
        "fused_convolutions": engine.fusion.fused_convolutions, "folded_weights": engine.fusion.folded_weights,
        "output_quantizers": engine.fusion.output_quantizers,
        "ort_graph": engine.describe().get("ort_graph"), "int8_model": engine.describe().get("int8_model"),
        "same_copy_as_engine": copy == (engine.saturation, engine.fusion),
        "ms_median": ms, "ms_min": {k: float(np.min(v) * 1e3) for k, v in times.items()},
        "speedup_vs_ort_fp32_paired_median": paired,
        "speedup_vs_ort_fp32": {k: ms["ort_fp32"] / v for k, v in ms.items()},
        "sqnr_db_vs_ort_fp32": {k: sqnr_db(ref, v) for k, v in outputs.items() if k != "ort_fp32"},
        "cpu_ms_median": {k: float(np.median(v) * 1e3) for k, v in cpu.items()},
        "times_s": times, "cpu_times_s": cpu, "repeats": repeats, "load_average_1min": load, "profiles": profiles,
        "conv_classes": dict(Counter(classes.values())),
        "fp32_kernel_ms_by_class": fp32_time_by_class(profiles["ort_fp32"], classes),
    }


def _conv_model(kind: str, channels: int, size: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """One 3x3x3 convolution, ``channels`` in and out at ``size``³: float (folded weights), ConvInteger with a
    float epilogue, or QDQ with a u8 output quantizer (ONNX Runtime fuses it into QLinearConv)."""
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (channels, channels, 3, 3, 3)).astype(np.int8)
    scale = np.full(channels, 1e-3, np.float32)
    shape = [1, channels, size, size, size]
    conv = {"kernel_shape": [3, 3, 3], "pads": [1] * 6}
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
             numpy_helper.from_array(np.array(128, np.uint8), "xzp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
             numpy_helper.from_array(np.array(0, np.uint8), "yzp")]
    if kind == "float":
        inits.append(numpy_helper.from_array(q.astype(np.float32) * scale[:, None, None, None, None], "w"))
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], **conv), helper.make_node("Relu", ["c"], ["y"])]
    elif kind == "convinteger":  # integer convolution with a float output: ConvInteger, then Cast and Mul
        inits += [numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), "wu"),
                  numpy_helper.from_array(np.array(128, np.uint8), "wzp"),
                  numpy_helper.from_array((0.02 * scale).reshape(1, -1, 1, 1, 1), "acc_scale")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
                 helper.make_node("ConvInteger", ["xq", "wu", "xzp", "wzp"], ["acc"], **conv),
                 helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["accf", "acc_scale"], ["y"])]
    else:
        inits += [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale, "ws")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0),
                 helper.make_node("Conv", ["xd", "w"], ["c"], **conv),
                 helper.make_node("QuantizeLinear", ["c", "ys", "yzp"], ["yq"]),
                 helper.make_node("DequantizeLinear", ["yq", "ys", "yzp"], ["y"])]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, rng.normal(0, 1, shape).astype(np.float32)


def micro(repeats: int) -> list[dict[str, Any]]:
    """Float Conv vs QLinearConv (u8 in and out, ORT's channels-last kernel with its transposes) per shape."""
    rows = []
    for channels, size in ((8, 96), (16, 96), (16, 48), (32, 48), (32, 24), (64, 24), (64, 12), (128, 12)):
        row: dict[str, Any] = {"channels": channels, "size": size}
        sessions = {kind: (_session(m.SerializeToString()), x)
                    for kind, (m, x) in ((k, _conv_model(k, channels, size))
                                         for k in ("float", "qlinearconv", "convinteger"))}
        for session, x in sessions.values():
            session.run(None, {"x": x})
        times: dict[str, list[float]] = {k: [] for k in sessions}
        cpu: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(repeats):
            for kind, (session, x) in sessions.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                session.run(None, {"x": x})
                times[kind].append(time.perf_counter() - start)
                cpu[kind].append(time.process_time() - start_cpu)
        row.update({f"{k}_ms_min": float(np.min(v) * 1e3) for k, v in times.items()})
        row.update({f"{k}_cpu_ms_min": float(np.min(v) * 1e3) for k, v in cpu.items()})
        row["qlinearconv_speedup"] = row["float_ms_min"] / row["qlinearconv_ms_min"]
        row["convinteger_speedup"] = row["float_ms_min"] / row["convinteger_ms_min"]
        rows.append(row)
        print(f"micro {channels} ch {size}^3: float {row['float_ms_min']:.1f} ms, QLinearConv "
              f"{row['qlinearconv_ms_min']:.1f} ms, ConvInteger {row['convinteger_ms_min']:.1f} ms", flush=True)
    return rows


def _spread(row: dict[str, Any], key: str) -> str:
    """Interquartile range of the per-round ratios ORT FP32 time / ``key`` time."""
    ratios = np.array(row["times_s"]["ort_fp32"]) / np.array(row["times_s"][key])
    return f"IQR {np.percentile(ratios, 25):.2f}-{np.percentile(ratios, 75):.2f}"


def _cpu_cell(row: dict[str, Any]) -> str:
    cpu = row.get("cpu_ms_median")
    if not cpu:
        return "—"
    return " / ".join(f"{cpu[k] / 1e3:.2f}" for k in ("ort_fp32", "ort_int8_file", "ort_int8_fused"))


def _top_ops(profile: dict[str, Any], n: int = 5) -> str:
    return ", ".join(f"{op} {ms:.0f}" for op, ms in list(profile["kernel_ms"].items())[:n])


def run_summary(row: dict[str, Any]) -> dict[str, Any]:
    """What a later run of the same model keeps of this one: paired ratios vs ORT FP32, load, when, how."""
    loads = row["load_average_1min"]
    return {"model": row["model"], "date": row.get("date"), "command": row.get("command"),
            "repeats": row["repeats"], "load_average_1min": [min(loads), max(loads)],
            "speedup_vs_ort_fp32_paired_median": row["speedup_vs_ort_fp32_paired_median"],
            "sqnr_db_vs_ort_fp32": row["sqnr_db_vs_ort_fp32"]}


def render(report: dict[str, Any]) -> str:
    """The Markdown report."""
    lines = ["# ONNX Runtime INT8 vs FP32 per patch (issue 9, point 4)", "",
             "Per model: one real CT patch at the model's roi, batch 1, 2 threads; ORT FP32, ORT INT8 on the file "
             "as written (before), ORT INT8 through the engine's ORT-specific copy (after, `engines/ort_fused.py`) "
             "and OpenVINO INT8 timed interleaved round by round (seeded random order in each round) after one "
             "warm-up each. ms = median; 'x FP32' = median over rounds of ORT FP32 time / variant time in the same "
             "round (IQR: its interquartile range over the rounds); CPU s = median process CPU time of a call (both "
             "threads, ORT's spin-waiting included). SQNR of INT8 logits vs ORT FP32 logits on the same patch.", "",
             "| model | input | QLinearConv: Relu-fed + file's ORT output quantizers / weights folded | ORT FP32 ms | ORT INT8 before ms (x FP32) "
             "| ORT INT8 after ms (x FP32) | OpenVINO INT8 ms | CPU s per call FP32 / before / after | "
             "SQNR dB ORT before / after / OpenVINO | ORT INT8 after faster than FP32 | load avg (1 min) during |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for r in report["rows"]:
        ms, sp, db = r["ms_median"], r["speedup_vs_ort_fp32_paired_median"], r["sqnr_db_vs_ort_fp32"]
        shape = "x".join(str(d) for d in r["input_shape"][2:])
        load = r["load_average_1min"]
        lines.append(
            f"| {r['model']} | {shape} | {r['fused_convolutions']} + {r.get('output_quantizers', 0)} / "
            f"{r['folded_weights']} | {ms['ort_fp32']:.0f} "
            f"| {ms['ort_int8_file']:.0f} ({sp['ort_int8_file']:.2f}x, {_spread(r, 'ort_int8_file')}) "
            f"| {ms['ort_int8_fused']:.0f} ({sp['ort_int8_fused']:.2f}x, {_spread(r, 'ort_int8_fused')}) "
            f"| {ms['openvino_int8']:.0f} | {_cpu_cell(r)} | {db['ort_int8_file']:.2f} / "
            f"{db['ort_int8_fused']:.2f} / {db['openvino_int8']:.2f} | "
            f"{'yes' if sp['ort_int8_fused'] > 1 else 'no'} | {min(load):.1f}-{max(load):.1f} |")
    if report.get("earlier_runs"):
        lines += ["", "Earlier runs of the same models (replaced above; the spread between runs is the load's):", "",
                  "| model | date | rounds | load avg | ORT INT8 before x FP32 | ORT INT8 after x FP32 |",
                  "|---|---|---:|---|---:|---:|"]
        for e in report["earlier_runs"]:
            sp, load = e["speedup_vs_ort_fp32_paired_median"], e["load_average_1min"]
            lines.append(f"| {e['model']} | {e.get('date') or '—'} | {e['repeats']} | {load[0]:.1f}-{load[1]:.1f} "
                         f"| {sp['ort_int8_file']:.2f}x | {sp['ort_int8_fused']:.2f}x |")
    lines += ["", "Where the time goes (ONNX Runtime profiler, kernel ms per op type, one run; top 5):", "",
              "| model | ORT FP32 | ORT INT8 before | ORT INT8 after | QLinearConv / DequantizeLinear in ORT's "
              "optimized graph, before → after |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        p = r["profiles"]
        before, after = p["ort_int8_file"]["optimized_ops"], p["ort_int8_fused"]["optimized_ops"]
        lines.append(f"| {r['model']} | {_top_ops(p['ort_fp32'])} | {_top_ops(p['ort_int8_file'])} | "
                     f"{_top_ops(p['ort_int8_fused'])} | {before.get('QLinearConv', 0)} / "
                     f"{before.get('DequantizeLinear', 0)} → {after.get('QLinearConv', 0)} / "
                     f"{after.get('DequantizeLinear', 0)} |")
    classes = ("fused", "few channels", "float output", "ConvTranspose", "float layer", "other ops")
    lines += ["", "Where ORT FP32 spends its time, by what the engine's copy of the INT8 file lets ONNX Runtime's "
              "CPU provider run in integer (% of FP32 kernel time; convolutions counted in brackets): `fused` runs "
              "as QLinearConv (the file's own output quantizers and those it records for ONNX Runtime).", "",
              "| model | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for r in report["rows"]:
        by, count = r["fp32_kernel_ms_by_class"], r["conv_classes"]
        total = sum(by.values()) or 1.0
        cells = [f"{100 * by.get(c, 0.0) / total:.0f}%" + (f" ({count.get(c, 0)})" if c != "other ops" else "")
                 for c in classes]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    if report.get("micro"):
        lines += ["", "One 3x3x3 convolution, C in and out, ORT float Conv vs its integer kernels: QLinearConv "
                  "(quantized output) and ConvInteger + Cast + Mul (float output); min of "
                  f"{report['micro_repeats']} interleaved calls (`{report.get('micro_command', '')}`):", "",
                  "| C | size | float ms | QLinearConv ms (speed-up) | ConvInteger ms (speed-up) | CPU ms float / "
                  "QLinearConv / ConvInteger |", "|---:|---:|---:|---:|---:|---|"]
        for m in report["micro"]:
            conv_int = (f"{m['convinteger_ms_min']:.1f} ({m['convinteger_speedup']:.2f}x)"
                        if "convinteger_ms_min" in m else "—")
            lines.append(f"| {m['channels']} | {m['size']}³ | {m['float_ms_min']:.1f} | {m['qlinearconv_ms_min']:.1f} "
                         f"({m['qlinearconv_speedup']:.2f}x) | {conv_int} | "
                         + (" / ".join(f"{m[k + '_cpu_ms_min']:.1f}" for k in ("float", "qlinearconv", "convinteger"))
                            if "float_cpu_ms_min" in m else "—") + " |")
    faster = [r["model"] for r in report["rows"] if r["speedup_vs_ort_fp32_paired_median"]["ort_int8_fused"] > 1]
    loads = [x for r in report["rows"] for x in r["load_average_1min"]]
    busy = max(loads) >= 1.5 * THREADS  # the runs' own two threads give a load of about 2
    load_text = (f"with a 1-minute load average of {min(loads):.1f}-{max(loads):.1f} on 2 cores, other processes "
                 "included: per-call times were above a quiet machine's and the per-round ratios spread (IQR), so "
                 "a ratio near 1 is not established either way" if busy else
                 f"on a machine without other work (1-minute load average {min(loads):.1f}-{max(loads):.1f}, the "
                 "runs' own 2 threads); the IQR column is the spread over the rounds")
    lines += ["", "## Reading", "",
              f"ORT INT8 (the engine's copy) was faster than ORT FP32 on {len(faster)} of {len(report['rows'])} "
              f"models in these runs{' (' + ', '.join(faster) + ')' if faster else ''}, {load_text}; the SQNR "
              "columns and the profiles' structure (which ops are float) do not depend on load. ONNX Runtime's CPU "
              "provider runs a convolution in integer only as QLinearConv, which it makes from "
              "`DQ(x), DQ(w) → Conv → Q` when the input and output quantizers have the same type "
              "(`tests/test_ort_fused.py`); everything else runs in float between Q/DQ. The copy fuses every "
              "convolution whose output the file already quantizes alone, adds the output quantizers the file "
              "records for ONNX Runtime (chosen by `medptq quantize` under an SQNR budget, "
              "`calibrate/ort_outputs.py`: the second number in the QLinearConv column; TensorRT and OpenVINO do "
              "not see them) and dequantizes the other weights once (DequantizeLinear count before → after). What "
              "stays float: ConvTranspose (no integer kernel in the CPU provider), the float layers, and "
              "convolutions read in float whose output quantizer would cost more SQNR than the budget allows (for "
              "these the only integer kernel with a float output, ConvInteger, is slower than the float "
              "convolution: micro table). At few channels and high resolution QLinearConv itself is slower than "
              "the float convolution (micro table), hence `ort_fused.MIN_CHANNELS`.", ""]
    commands = sorted({r.get("command", report["command"]) for r in report["rows"]}
                      | ({report["micro_command"]} if report.get("micro_command") else set()))
    lines += [f"{machine_line(report['machine'])} The variants were interleaved so that any load hits each "
              "alike (load average column: 2 cores).", "",
              "Commands: " + "; ".join(f"`{c}`" for c in commands) + ".", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="NAME=FOLDER (model.onnx, model_int8.onnx, "
                    "patch.npy)")
    ap.add_argument("--prepare", default="", help="comma-separated BUNDLE or BUNDLE:small to calibrate first")
    ap.add_argument("--bundles", default=str(ROOT / "bundles"))
    ap.add_argument("--work", default="", help="where prepared models go (default: a temporary folder)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--micro", action="store_true", help="also time single convolutions (float vs QLinearConv)")
    ap.add_argument("--out", default=str(ROOT / "reports"))
    args = ap.parse_args()
    ort.set_default_logger_severity(3)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medptq-ort-") as tmp:
        work = Path(args.work) if args.work else Path(tmp) / "work"
        models = [tuple(m.split("=", 1)) for m in args.model]
        for spec in [s for s in args.prepare.split(",") if s]:
            print(f"preparing {spec}", flush=True)
            models.append((spec.replace(":", "_"), str(prepare(spec, Path(args.bundles), work))))
        rows = []
        for name, folder in models:
            print(f"measuring {name}", flush=True)
            rows.append(measure(name, Path(folder), args.repeats, Path(tmp)))
            r = rows[-1]
            print(f"{name}: {r['ms_median']} {r['speedup_vs_ort_fp32_paired_median']} {r['sqnr_db_vs_ort_fp32']}",
                  flush=True)
        command = "python scripts/ort_int8_speed.py " + " ".join(sys.argv[1:])
        for row in rows:
            row["command"], row["date"] = command, machine_info()["date"]
        report: dict[str, Any] = {"machine": machine_info(), "rows": rows, "threads": THREADS, "command": command}
        if args.micro:
            report.update(micro_repeats=args.repeats, micro=micro(args.repeats), micro_command=command)
    report["minutes"] = (time.perf_counter() - start) / 60
    measured = bool(rows or args.micro)
    report = relative_paths(report)
    out = Path(args.out)
    old = out / "ort_int8.json"
    if old.is_file():  # a partial run replaces its own models' rows (and the micro table if re-measured)
        before = json.loads(old.read_text())
        names = {r["model"] for r in rows}
        report["earlier_runs"] = before.get("earlier_runs", []) + [
            run_summary(r) for r in before.get("rows", []) if r["model"] in names]
        report["rows"] = [r for r in before.get("rows", []) if r["model"] not in names] + report["rows"]
        if not measured:  # nothing new: re-render the last report as it was measured
            report["machine"] = before["machine"]
        if not args.micro and before.get("micro"):
            report.update({k: before[k] for k in ("micro", "micro_repeats", "micro_command") if k in before})
    out.mkdir(parents=True, exist_ok=True)
    # scratch model folders (outside the repository) are named from $TMPDIR, never by absolute path
    report = json.loads(json.dumps(report).replace(str(Path(tempfile.gettempdir()).resolve()) + os.sep, "$TMPDIR/"))
    write_text_atomic(out / "ort_int8.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "ort_int8.md", render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
