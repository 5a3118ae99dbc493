"""Run a bundle's configs in-process (what ``python -m monai.bundle run`` does), with timing."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from ..errors import MedPTQError


def bundle_parser(bundle: str | os.PathLike, configs: Sequence[str], **overrides) -> ConfigParser:
    """A ``ConfigParser`` over ``<bundle>/configs/<configs...>`` (merged in order) and its metadata.

    ``bundle_root`` is set to the bundle folder; ``overrides`` replace config keys like CLI flags.
    """
    root = Path(bundle).resolve()
    if not (root / "configs" / "metadata.json").is_file():
        raise MedPTQError(f"not a bundle folder (no configs/metadata.json): {root}")
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / c) for c in configs])
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(root), **overrides})
    return parser


def run_inference(
    bundle: str | os.PathLike, configs: Sequence[str] = ("inference.json",), warmup: bool = False, **overrides
) -> dict:
    """Run the bundle's ``evaluator`` and time it.

    Returns ``forward_seconds`` (sliding-window inference summed over volumes: ITERATION_STARTED →
    FORWARD_COMPLETED, i.e. without loading, preprocessing and saving), ``total_seconds`` (the whole
    run), ``volumes`` and the engine description. ``warmup`` first runs the network once on a zero
    batch of ``sw_batch_size`` patches (OpenVINO compiles, torch allocates) and reports that time as
    ``warmup_seconds``, outside the other timings.
    """
    from ignite.engine import Events
    from monai.engines.utils import IterationEvents

    parser = bundle_parser(bundle, configs, **overrides)
    evaluator = parser.get_parsed_content("evaluator")
    network = parser.get_parsed_content("network")
    warmup_seconds = None
    if warmup:
        shape = (int(parser.get_parsed_content("sw_batch_size")), int(parser.get_parsed_content("in_channels")),
                 *[int(r) for r in parser.get_parsed_content("roi_size")])
        start = time.perf_counter()
        with torch.no_grad():
            network.eval()(torch.zeros(shape, device=parser.get_parsed_content("device")))
        warmup_seconds = time.perf_counter() - start
    marks: dict[str, float] = {}
    forward: list[float] = []
    evaluator.add_event_handler(Events.ITERATION_STARTED, lambda _e: marks.__setitem__("start", time.perf_counter()))
    evaluator.add_event_handler(
        IterationEvents.FORWARD_COMPLETED, lambda _e: forward.append(time.perf_counter() - marks["start"])
    )
    start = time.perf_counter()
    evaluator.run()
    total = time.perf_counter() - start
    engine = getattr(network, "engine", None)
    return {
        "forward_seconds": float(sum(forward)),
        "per_volume_seconds": forward,
        "total_seconds": total,
        "warmup_seconds": warmup_seconds,
        "volumes": len(forward),
        "engine": engine.describe() if engine is not None else {"engine": "torch-module"},
        "metrics": dict(evaluator.state.metrics),
    }
