"""Cohort inference throughput for 1 and 2 workers on this machine: writes reports/cohort.{json,md}.

A bundle quantized by ``medptq quantize`` (default: the zoo-style test U-Net ``tests/zoo_bundles/ct_unet_prelu``
with seeded weights, quantized on the small real CT in a scratch copy) segments a cohort of ``--cases`` copies of
the real abdominal CT (``tests/data/totalseg_ct/images/abdomen_ct.nii.gz``, 122x101x112) with ``medptq infer``'s
own code path (``run_cohort``), once per configuration: 1 worker x all cores, 2 workers x half the cores
(embedded), and with ``--ray`` the same two on a Ray instance started for the run. Throughput excludes engine
start-up (reported separately). Names the machine, its load and the INT8 ISA.

    python scripts/cohort_bench.py [--cases 8] [--bundle B] [--ray] [--out reports]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "tests" / "data" / "totalseg_ct" / "images" / "abdomen_ct.nii.gz"
CT_SMALL_DIR = ROOT / "tests" / "data" / "totalseg_ct" / "images_small"


def quantized_test_bundle(scratch: Path) -> Path:
    """The zoo-style PReLU U-Net with seeded weights, quantized (mse, 8 patches) on the small real CT."""
    import torch

    from medptq_monai.bundle.bundle_config import read_bundle
    from medptq_monai.bundle.quantize_bundle import quantize_bundle

    bundle = Path(shutil.copytree(ROOT / "tests" / "zoo_bundles" / "ct_unet_prelu", scratch / "ct_unet_prelu"))
    torch.manual_seed(0)
    network = read_bundle(bundle).parsed("network_def", "benchmark")
    (bundle / "models").mkdir()
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    quantize_bundle(bundle, dataset_dir=str(CT_SMALL_DIR), num_patches=8, heldout_patches=1, progress=False)
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--bundle", default=None, help="a bundle quantized by medptq quantize (default: test U-Net)")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--ray", action="store_true", help="also run on a local Ray instance started for the run")
    parser.add_argument("--out", default="reports")
    args = parser.parse_args()

    from medptq_monai.cohort import run_cohort
    from medptq_monai.engines.cpu_isa import isa_line
    from medptq_monai.fileio import relative_paths, write_text_atomic
    from medptq_monai.machine import machine_info, machine_line

    cpus = len(os.sched_getaffinity(0))
    configs = [("embedded", 1, cpus, None), ("embedded", 2, max(1, cpus // 2), None)]
    if args.ray:
        configs += [("ray", 1, cpus, "local"), ("ray", 2, max(1, cpus // 2), "local")]
    machine = machine_info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="medptq-cohort-bench-") as tmp:
        scratch = Path(tmp)
        bundle = Path(args.bundle) if args.bundle else quantized_test_bundle(scratch)
        cohort = scratch / "cohort"
        cohort.mkdir()
        for i in range(args.cases):
            shutil.copy(CT, cohort / f"ct_{i:03d}.nii.gz")
        for mode, workers, threads, address in configs:
            out = scratch / f"out_{mode}_{workers}"
            summary = run_cohort(bundle, cohort, out, engine=args.engine, workers=workers, threads=threads,
                                 ray_address=address, progress=False, echo=True)
            if summary["failed"] or summary["ok"] != args.cases:
                sys.exit(f"benchmark run {mode} x{workers} did not segment every case: {summary['failures']}")
            rows.append({key: summary[key] for key in (
                "mode", "workers", "threads", "ok", "wall_seconds", "startup_seconds", "cases_per_hour",
                "voxels_per_second", "latency_seconds", "engine", "precision", "isa")})
            print(json.dumps(rows[-1]), flush=True)
        if any(c[3] for c in configs):
            import ray

            ray.shutdown()
        model = summary["model_file"]
        bundle_name = bundle.name if args.bundle else "tests/zoo_bundles/ct_unet_prelu (seeded weights, quantized " \
            "mse/8)"
    report = {"machine": machine, "isa_line": isa_line(machine["int8_isa"]), "bundle": bundle_name,
              "model_file": Path(model).name, "cases": args.cases,
              "case": "tests/data/totalseg_ct/images/abdomen_ct.nii.gz (122x101x112, 3 mm)", "runs": rows}
    out_dir = Path(args.out)
    write_text_atomic(out_dir / "cohort.json", json.dumps(relative_paths(report), indent=2) + "\n")
    lines = [
        "# Cohort inference throughput (`python scripts/cohort_bench.py" + (" --ray" if args.ray else "") + "`)",
        "",
        machine_line(machine),
        "",
        f"Bundle: {bundle_name}, INT8 model `{Path(model).name}`; cohort: {args.cases} copies of the real abdominal "
        "CT (122x101x112 voxels, 3 mm); each case = the bundle's preprocessing (RAS, 4 mm resampling, HU window), "
        "sliding-window INT8 inference (roi 32³, overlap 0.25), postprocessing back to the source grid, atomic NIfTI "
        "write, sha256 of input and output. Throughput excludes engine start-up (own column).",
        "",
        "| mode | workers x threads | engine (ISA) | cases | wall s | start-up s | cases/hour | voxels/s | "
        "latency p50 / p90 / max s |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lat = r["latency_seconds"]
        lines.append(f"| {r['mode']} | {r['workers']} x {r['threads']} | {r['engine']} {r['precision']} ({r['isa']}) "
                     f"| {r['ok']} | {r['wall_seconds']:.1f} | {r['startup_seconds']:.1f} | {r['cases_per_hour']:.0f} "
                     f"| {r['voxels_per_second']:.3g} | {lat['p50']:.2f} / {lat['p90']:.2f} / {lat['max']:.2f} |")
    write_text_atomic(out_dir / "cohort.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
