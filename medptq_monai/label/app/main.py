"""MONAI Label app serving quantized MONAI bundles through their INT8 engines.

``monailabel start_server --app medptq_monai/label/app --studies DIR --conf models bundles/unet_int8,my_bundle``

Any quantized bundle is served: ours, or any MONAI bundle after ``medptq quantize`` (its
``configs/inference_int8.json`` overlay and ``models/model_int8.onnx``). Options (``--conf KEY VALUE``):
``models`` (comma-separated bundle folders, or names of folders in ``bundles_dir``; ``all``, the default,
serves every bundle in ``bundles_dir``), ``bundles_dir`` (default: ``bundles`` in the server's working
folder), ``engine`` (``auto``, ``openvino``, ``onnxruntime``, ``tensorrt``, ``torch``; default ``auto``),
``fp32`` (``true`` also serves each bundle's FP32 model as ``<name>_fp32``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.utils.others.generic import strtobool

from medptq_monai.errors import BundleConfigError
from medptq_monai.label.infer_task import EngineInferTask

logger = logging.getLogger(__name__)


def _is_bundle(path: Path) -> bool:
    return (path / "configs" / "metadata.json").is_file() and (path / "configs" / "inference.json").is_file()


class MedPTQApp(MONAILabelApp):
    """Serves each requested bundle folder with ``EngineInferTask`` (INT8, optionally FP32 too)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundles_dir = Path(conf.get("bundles_dir") or "bundles").expanduser().resolve()
        self.engine = conf.get("engine", "auto")
        self.serve_fp32 = bool(strtobool(conf.get("fp32", "false")))
        wanted = [m.strip() for m in conf.get("models", "all").split(",") if m.strip()]
        if wanted in ([], ["all"]):
            found = sorted(p for p in self.bundles_dir.glob("*") if _is_bundle(p)) if self.bundles_dir.is_dir() else []
        else:
            found = [self._locate(m) for m in wanted]
        if not found:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR,
                                      f"no bundle in {self.bundles_dir} (set --conf models FOLDER,... or "
                                      "--conf bundles_dir PATH)")
        names = [p.name for p in found]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR,
                                      f"two bundles share the folder name {', '.join(clashes)}; rename one")
        self.bundles = dict(zip(names, found))
        self.models = names
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="medptq-monai",
            description="INT8 post-training-quantized MONAI bundles served through their INT8 engines",
            version="0.1.0",
        )

    def _locate(self, model: str) -> Path:
        """A bundle given as a folder path, or as the name of a folder in ``bundles_dir``."""
        for path in (Path(model).expanduser(), self.bundles_dir / model):
            if _is_bundle(path):
                return path.resolve()
        raise MONAILabelException(
            MONAILabelError.APP_INIT_ERROR,
            f"no bundle {model!r}: neither {Path(model).expanduser().resolve()} nor {self.bundles_dir / model} holds "
            "configs/inference.json and configs/metadata.json (set --conf bundles_dir PATH or give the folder)",
        )

    def init_infers(self) -> dict[str, InferTask]:
        tasks: dict[str, InferTask] = {}
        for name, bundle in self.bundles.items():
            try:
                tasks[name] = EngineInferTask(bundle, precision="int8", engine=self.engine)
                if self.serve_fp32:
                    tasks[f"{name}_fp32"] = EngineInferTask(bundle, precision="fp32", engine=self.engine)
            except BundleConfigError as err:
                logger.warning("%s is not served: %s", name, err)
        for name, task in tasks.items():
            if not task.is_valid():
                logger.warning("%s is not served: %s missing (quantize the bundle first)", name, task.get_path(False))
        return tasks
