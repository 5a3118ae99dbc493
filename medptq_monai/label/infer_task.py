"""A MONAI Label infer task that serves a quantized bundle through its own engine.

MONAI Label's stock ``BundleInferTask`` builds ``network_def`` and loads ``models/model.pt``
itself, so an INT8 bundle would silently run FP32. This task instead instantiates the bundle's
``network`` component (the INT8 or FP32 engine) with ``bundle_root`` set to the bundle folder, and
runs the bundle's own ``preprocessing``, ``inferer`` and ``postprocessing`` (minus its file writers;
MONAI Label writes the result). Any quantized bundle is served: any MONAI bundle (ours included) with the
overlay ``configs/inference_int8.json`` written by ``medptq quantize``, merged after ``inference.json``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.inferers import Inferer
from monai.transforms import Compose, MapTransform, SqueezeDimd
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import name_to_device

from ..bundle.overlay import OVERLAY_NAME, int8_configs
from ..bundle.runner import bundle_parser
from ..engines import check_engine_name, check_precision
from ..errors import BundleConfigError

logger = logging.getLogger(__name__)

_HIDDEN = "medptq_hidden_keys"


class HideKeysd:
    """Move non-mapping values of ``<key>_*`` entries (e.g. MONAI Label's string ``image_path``) aside.

    MONAI 1.6's ``Spacingd`` calls ``.update(meta)`` on every ``<key>_*`` entry of the data dict
    after resampling ``key``; MONAI Label puts ``image_path`` (a string) in that dict, which then
    fails with ``'str' object has no attribute 'update'``. ``RestoreKeysd`` puts the values back.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.prefixes = tuple(f"{k}_" for k in keys)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        hidden = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and k.startswith(self.prefixes) and not isinstance(d[k], Mapping)
        }
        d[_HIDDEN] = {**d.get(_HIDDEN, {}), **hidden}
        return d


class RestoreKeysd:
    """Undo ``HideKeysd``."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        d.update(d.pop(_HIDDEN, {}))
        return d


def _map_keys(transforms: Sequence[Callable]) -> list[str]:
    keys: list[str] = []
    for t in transforms:
        if isinstance(t, MapTransform):
            keys += [str(k) for k in t.keys if str(k) not in keys]
    return keys


class EngineInferTask(BasicInferTask):
    """Segmentation with a medptq bundle's engine (INT8 by default, ``precision='fp32'`` for the reference).

    ``engine`` and ``precision`` override the bundle's config keys of the same name. The engine is
    built at start-up for ``device`` (default: the device MONAI Label picks for requests), so ``/info`` reports
    the engine that really serves the model (``engine`` entry and description).
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        precision: str = "int8",
        engine: str = "auto",
        device: str | None = None,
        config_files: Sequence[str] | None = None,
    ) -> None:
        self.bundle = Path(bundle).resolve()
        self.overrides: dict[str, Any] = {"engine": check_engine_name(engine), "precision": check_precision(precision)}
        self.config_files = tuple(config_files) if config_files is not None else int8_configs(self.bundle)
        if OVERLAY_NAME not in self.config_files:
            raise BundleConfigError(f"{self.bundle} has no configs/{OVERLAY_NAME}: quantize it first with "
                                    f"medptq quantize {self.bundle} --dataset_dir <image folder>")
        if str(self.bundle) not in sys.path:  # bundles with a ``scripts`` package, like ``monai.bundle run``
            sys.path.insert(0, str(self.bundle))
        self.parser = self._parser()
        meta = self.parser.get("_meta_", {})
        channels = meta["network_data_format"]["outputs"]["pred"].get("channel_def", {})
        labels = {str(name): int(idx) for idx, name in channels.items() if int(idx) != 0}
        self._lock = threading.Lock()
        self._bundle_inferer: Inferer = self.parser.get_parsed_content("inferer")
        pre: Compose = self.parser.get_parsed_content("preprocessing")
        post: Compose = self.parser.get_parsed_content("postprocessing")
        self._pre = list(pre.transforms)
        self._post = [t for t in post.transforms if not type(t).__name__.startswith("Save")]
        self._hidden_keys = _map_keys(self._pre + self._post)
        super().__init__(
            path=str(self.parser.get_parsed_content("engine_model_file")),
            network=None,
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description=f"{meta.get('name', self.bundle.name)} {meta.get('version', '')}",
            config={"result_dtype": "uint8"},
            roi_size=self.parser.get_parsed_content("inferer#roi_size"),
        )
        self.engine_info: dict[str, str] = {}
        if self.is_valid():
            self._get_network(name_to_device(device or self._config.get("device")), None)

    def _parser(self, **overrides: Any) -> ConfigParser:
        return bundle_parser(self.bundle, self.config_files, **self.overrides, **overrides)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "bundle": str(self.bundle), "engine": self.engine_info}

    def is_valid(self) -> bool:
        path = self.get_path(validate=False)
        return bool(path and os.path.isfile(path))

    def pre_transforms(self, data: Mapping | None = None) -> Sequence[Callable]:
        image = (data or {}).get("image")
        if isinstance(image, str) and not os.path.exists(image):
            what = f"image file not found: {image}" if image else "unknown image id (not in the datastore)"
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, what)
        return [HideKeysd(self._hidden_keys), *self._pre, RestoreKeysd()]

    def post_transforms(self, data: Mapping | None = None) -> Sequence[Callable]:
        return [HideKeysd(self._hidden_keys), *self._post, SqueezeDimd(keys="pred", dim=0), RestoreKeysd()]

    def inferer(self, data: Mapping | None = None) -> Inferer:
        return self._bundle_inferer

    def _get_network(self, device: str, data: Mapping | None) -> torch.nn.Module:
        """The bundle's ``network`` (an ``EngineNetwork``) for ``device``, built once and cached."""
        with self._lock:
            cached = self._networks.get(device)
            if cached is None:
                network = self._parser(device=device).get_parsed_content("network").eval()
                engine = getattr(network, "engine", None)
                described = engine.describe() if engine is not None else {"engine": type(network).__name__}
                self.engine_info = dict(described)
                self.description = (
                    f"{self.bundle.name}: {described.get('precision', '?').upper()} engine "
                    f"{described['engine']} on {described.get('device', device)} ({Path(self.get_path(False)).name})"
                )
                logger.info("%s serves %s", self.bundle.name, described)
                cached = self._networks[device] = (network, 0.0)
            return cached[0]
