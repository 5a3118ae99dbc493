"""Machine description and peak-memory sampling for reports."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import torch

from .engines.cpu_isa import isa_line, isa_report


class PeakRSS:
    """Context manager sampling the RSS of ``pid`` (default: this process) and its children in a
    background thread every ``interval`` seconds; ``peak`` is the largest sum seen."""

    def __init__(self, pid: int | None = None, interval: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        """Current RSS of the process tree in bytes (0 once the process is gone)."""
        try:
            procs = [self.process, *self.process.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self.start = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, INT8 ISA (``cpu_isa``), cores, threads, memory, load, GPU, package versions, date, command."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "int8_isa": isa_report(),
        "cpu_count": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            pkg: _version(pkg)
            for pkg in ("medptq-monai", "torch", "monai", "onnx", "onnxruntime", "openvino", "tensorrt", "numpy")
        },
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv),
    }
    info["summary"] = (
        f"{info['cpu_model']} (INT8 ISA {info['int8_isa']['host']}), {info['cpu_count']} logical CPUs ({info['physical_cores']} cores), "
        f"torch threads {info['torch_threads']}, {info['memory_bytes'] / (1 << 30):.0f} GiB RAM"
        + (f", GPU {gpu}" if gpu else ", no GPU")
    )
    return info


def machine_line(m: dict[str, Any]) -> str:
    """One Markdown line for a report: machine, INT8 ISA per engine, load, versions, date (``m`` from ``machine_info``)."""
    v = m["versions"]
    return (f"Machine: {m['summary']}; {isa_line(m['int8_isa'])}; load average {m['load_average']}; "
            f"torch {v['torch']}, MONAI {v['monai']}, ONNX Runtime {v['onnxruntime']}, OpenVINO {v['openvino']}, "
            f"TensorRT {v['tensorrt']}; {m['date']}.")
