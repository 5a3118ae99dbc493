"""End-of-run figures: counts, throughput (cases/hour, voxels/s) and per-case latency percentiles."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def latency_percentiles(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p95/p99 and max of per-case seconds (``None`` when no case ran)."""
    values = np.asarray([float(s) for s in seconds if s is not None], dtype=np.float64)
    if not values.size:
        return {**{f"p{p}": None for p in PERCENTILES}, "max": None}
    out: dict[str, float | None] = {f"p{p}": round(float(np.percentile(values, p)), 3) for p in PERCENTILES}
    out["max"] = round(float(values.max()), 3)
    return out


def summarize(rows: Sequence[Mapping[str, Any]], skipped: int, wall_seconds: float, retries: int,
              pool: Mapping[str, Any]) -> dict[str, Any]:
    """The run's summary from the rows it wrote (``ok``/``failed``), the skipped count and the wall time."""
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") == "failed"]
    voxels = sum(int(r.get("voxels") or 0) for r in ok)
    wall = max(float(wall_seconds), 1e-9)
    return {
        "cases": len(rows) + skipped,
        "ok": len(ok),
        "failed": len(failed),
        "skipped": skipped,
        "retries": retries,
        "wall_seconds": round(wall_seconds, 3),
        "cases_per_hour": round(len(ok) / wall * 3600.0, 1) if ok else 0.0,
        "voxels_per_second": round(voxels / wall, 1) if ok else 0.0,
        "latency_seconds": latency_percentiles([r.get("seconds") for r in ok]),
        "failures": [{"case": r["case"], "error": r.get("error")} for r in failed],
        **pool,
    }


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """Human-readable lines for the end of a run."""
    lat = summary["latency_seconds"]
    lines = [
        f"medptq infer: {summary['cases']} case(s): {summary['ok']} ok, {summary['failed']} failed, "
        f"{summary['skipped']} skipped (already done), {summary['retries']} retried after a lost worker; "
        f"{summary['wall_seconds']:.1f} s (after {summary.get('startup_seconds', 0):.1f} s loading engines) on "
        f"{summary['workers']} {summary['mode']} worker(s) x {summary['threads']} thread(s)",
        f"engine {summary.get('engine')} {summary.get('precision')}, INT8 ISA {summary.get('isa')}, "
        f"model sha256 {str(summary.get('model_sha256'))[:12]}",
    ]
    if summary["ok"]:
        lines.append(
            f"throughput {summary['cases_per_hour']:.0f} cases/hour, {summary['voxels_per_second']:.3g} voxels/s; "
            "per-case latency " + ", ".join(f"{k} {v:.2f} s" for k, v in lat.items() if v is not None))
    for failure in summary["failures"]:
        lines.append(f"FAILED {failure['case']}: {failure['error']}")
    lines.append(f"manifest: {summary['manifest']}")
    return lines
