"""Which x86 INT8 instruction path a CPU engine takes, and whether its products saturate.

INT8 convolutions on x86 multiply u8 activations by s8 weights. With VNNI (AVX-512 VNNI,
AVX-VNNI) or AMX each product is accumulated in 32 bits. Without them (AVX2 or AVX-512 without
VNNI, older SSE) the kernels use ``vpmaddubsw``, which adds each *pair* of u8·s8 products into a
signed 16-bit lane and saturates when ``|a1*w1 + a2*w2| > 32767`` (255·127·2 = 64770 can occur).
This is why ONNX Runtime has ``reduce_range`` and NNCF an overflow fix. On such CPUs the CPU engines
load a saturation-safe copy of the model (``saturation``: u8 ReLU outputs, 7-bit weights where the
input is signed); the file on disk stays the 8-bit file TensorRT reads.

OpenVINO's oneDNN honours ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX2`` shows the AVX2 path on a VNNI
host); ONNX Runtime's MLAS dispatches on the CPU's own flags and has no such cap.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Mapping
from pathlib import Path

# The INT8 paths are the keys of ISA_LABELS; these three accumulate u8·s8 products in 32 bits.
INT32_ACCUMULATION = frozenset({"avx_vnni", "avx512_vnni", "amx"})
ISA_LABELS = {
    "sse": "SSE4/AVX (16-bit pair sums, saturating)",
    "avx2": "AVX2 without VNNI (16-bit pair sums, saturating)",
    "avx512": "AVX-512 without VNNI (16-bit pair sums, saturating)",
    "avx_vnni": "AVX-VNNI (32-bit accumulation)",
    "avx512_vnni": "AVX-512 VNNI (32-bit accumulation)",
    "amx": "AMX (32-bit accumulation)",
    "arm64": "Arm64",
}

# /proc/cpuinfo flag → feature used below
_FLAG_FEATURES = {"avx2": "avx2", "avx512bw": "avx512", "avx_vnni": "avx_vnni", "avx512_vnni": "avx512_vnni",
                  "amx_int8": "amx"}
# ONEDNN_MAX_CPU_ISA value → the features it leaves enabled (oneDNN's ISA names)
_ONEDNN_CAPS: dict[str, frozenset[str]] = {
    "SSE41": frozenset(),
    "AVX": frozenset(),
    "AVX2": frozenset({"avx2"}),
    "AVX2_VNNI": frozenset({"avx2", "avx_vnni"}),
    "AVX2_VNNI_2": frozenset({"avx2", "avx_vnni"}),
    "AVX512_CORE": frozenset({"avx2", "avx512"}),
    "AVX512_CORE_VNNI": frozenset({"avx2", "avx512", "avx512_vnni"}),
    "AVX512_CORE_BF16": frozenset({"avx2", "avx512", "avx512_vnni"}),
    "AVX512_CORE_FP16": frozenset({"avx2", "avx512", "avx512_vnni", "avx_vnni"}),
    "AVX10_1_512": frozenset({"avx2", "avx512", "avx512_vnni", "avx_vnni"}),
}
_ALL = frozenset(_FLAG_FEATURES.values())


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (or of the text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def classify(features: Iterable[str]) -> str:
    """The INT8 path (a key of ``ISA_LABELS``) an x86 CPU with these features (``_FLAG_FEATURES`` values) takes."""
    f = set(features)
    if "amx" in f and "avx512" in f:
        return "amx"
    if "avx512_vnni" in f and "avx512" in f:
        return "avx512_vnni"
    if "avx_vnni" in f and "avx2" in f:
        return "avx_vnni"
    if "avx512" in f:
        return "avx512"
    return "avx2" if "avx2" in f else "sse"


def _features(flags: Iterable[str]) -> frozenset[str]:
    return frozenset(feature for flag, feature in _FLAG_FEATURES.items() if flag in set(flags))


def onednn_cap(env: Mapping[str, str] | None = None) -> frozenset[str]:
    """Features left enabled by ``ONEDNN_MAX_CPU_ISA`` (or its older name ``DNNL_MAX_CPU_ISA``)."""
    env = os.environ if env is None else env
    value = (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()
    if value in _ONEDNN_CAPS:
        return _ONEDNN_CAPS[value]
    return _ALL  # ALL, DEFAULT and the AMX levels cap nothing this module distinguishes


def _host_flags(flags: Iterable[str] | None) -> frozenset[str] | None:
    """``flags``, else this CPU's (read once per call); None on 64-bit Arm."""
    if flags is not None:
        return frozenset(flags)
    return None if platform.machine().lower() in ("aarch64", "arm64") else cpu_flags()


def host_isa(flags: Iterable[str] | None = None) -> str:
    """The host CPU's own INT8 path (``arm64`` on 64-bit Arm, where int8 dot products accumulate in 32 bits)."""
    known = _host_flags(flags)
    return "arm64" if known is None else classify(_features(known))


def engine_isa(engine: str, flags: Iterable[str] | None = None, env: Mapping[str, str] | None = None) -> str:
    """The INT8 path ``engine`` takes here: OpenVINO's is the host's capped by ``ONEDNN_MAX_CPU_ISA``."""
    known = _host_flags(flags)
    if known is None:
        return "arm64"
    features = _features(known)
    return classify(features & onednn_cap(env) if engine == "openvino" else features)


def accumulates_in_32_bits(isa: str) -> bool:
    """True when u8·s8 products are summed in 32 bits (no saturation), False for the 16-bit pair sums."""
    return isa in INT32_ACCUMULATION or isa == "arm64"


def isa_report(flags: Iterable[str] | None = None, env: Mapping[str, str] | None = None) -> dict[str, object]:
    """Host ISA, each CPU engine's INT8 path and whether it runs the INT8 file as written or its saturation-safe copy."""
    flags = _host_flags(flags)
    host = host_isa(flags)
    engines = {}
    for engine in ("openvino", "onnxruntime"):
        isa = engine_isa(engine, flags, env)
        engines[engine] = {"isa": isa, "label": ISA_LABELS[isa], "int8_model": int8_model_label(isa)}
    cap = (os.environ if env is None else env).get("ONEDNN_MAX_CPU_ISA")
    return {"host": host, "label": ISA_LABELS[host], "onednn_max_cpu_isa": cap, "engines": engines}


def int8_model_label(isa: str) -> str:
    """What the CPU engines run on ``isa``: the INT8 file as written, or its saturation-safe copy."""
    return "as written" if accumulates_in_32_bits(isa) else "saturation-safe copy"


def isa_line(report: Mapping[str, object] | None = None) -> str:
    """One line for reports, e.g. ``INT8 ISA: host amx; openvino amx (model as written), ...``."""
    r = isa_report() if report is None else report
    parts = [f"{name} {e['isa']} (model {e['int8_model']})" for name, e in r["engines"].items()]  # type: ignore[union-attr]
    cap = f", ONEDNN_MAX_CPU_ISA={r['onednn_max_cpu_isa']}" if r.get("onednn_max_cpu_isa") else ""
    return f"INT8 ISA: host {r['host']}{cap}; " + ", ".join(parts)
