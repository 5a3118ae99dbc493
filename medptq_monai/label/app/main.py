"""MONAI Label app serving medptq INT8 bundles through their engines.

``monailabel start_server --app medptq_monai/label/app --studies DIR --conf models unet_int8``

Options (``--conf KEY VALUE``): ``models`` (comma-separated bundle names, or ``all`` for every
``*_int8`` bundle; default ``all``), ``bundles_dir`` (default: the repository's ``bundles/``),
``engine`` (``auto``, ``openvino``, ``onnxruntime``, ``tensorrt``, ``torch``; default ``auto``),
``fp32`` (``true`` also serves each bundle's FP32 model as ``<name>_fp32``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.utils.others.generic import strtobool

from medptq_monai.label.infer_task import DEFAULT_BUNDLES_DIR, EngineInferTask

logger = logging.getLogger(__name__)


class MedPTQApp(MONAILabelApp):
    """Serves each requested ``bundles_dir/<name>`` with ``EngineInferTask`` (INT8, optionally FP32 too)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundles_dir = Path(conf.get("bundles_dir") or DEFAULT_BUNDLES_DIR).expanduser().resolve()
        self.engine = conf.get("engine", "auto")
        self.serve_fp32 = bool(strtobool(conf.get("fp32", "false")))
        available = sorted(
            p.name for p in self.bundles_dir.glob("*_int8") if (p / "configs" / "metadata.json").is_file()
        )
        wanted = [m.strip() for m in conf.get("models", "all").split(",") if m.strip()]
        self.models = available if wanted in ([], ["all"]) else wanted
        unknown = [m for m in self.models if not (self.bundles_dir / m / "configs" / "metadata.json").is_file()]
        if unknown or not self.models:
            missing = ", ".join(unknown) or "*_int8"
            raise MONAILabelException(
                MONAILabelError.APP_INIT_ERROR,
                f"no bundle {missing} in {self.bundles_dir}; available: {', '.join(available) or 'none'}"
                " (set --conf bundles_dir PATH)",
            )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="medptq-monai",
            description="INT8 post-training-quantized MONAI bundles served through their INT8 engines",
            version="0.1.0",
        )

    def init_infers(self) -> dict[str, InferTask]:
        tasks: dict[str, InferTask] = {}
        for name in self.models:
            bundle = self.bundles_dir / name
            tasks[name] = EngineInferTask(bundle, precision="int8", engine=self.engine)
            if self.serve_fp32:
                tasks[f"{name}_fp32"] = EngineInferTask(bundle, precision="fp32", engine=self.engine)
        for name, task in tasks.items():
            if not task.is_valid():
                logger.warning("%s is not served: %s missing (calibrate the bundle first)", name, task.get_path(False))
        return tasks
