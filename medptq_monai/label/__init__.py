"""MONAI Label integration: ``EngineInferTask`` and the app folder ``APP_DIR`` (needs ``monailabel``).

``monailabel start_server --app <APP_DIR> --studies DIR --conf models bundles/unet_int8,path/to/my_bundle``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: MONAI Label app folder (its ``main.py`` defines the ``MONAILabelApp`` subclass).
APP_DIR = Path(__file__).resolve().with_name("app")


def __getattr__(name: str) -> Any:  # monailabel is optional: import the task only when asked for
    if name in ("EngineInferTask", "HideKeysd", "RestoreKeysd"):
        from . import infer_task

        return getattr(infer_task, name)
    raise AttributeError(name)


__all__ = ["APP_DIR", "EngineInferTask", "HideKeysd", "RestoreKeysd"]
