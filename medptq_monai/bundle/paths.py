"""Locating a bundle's root folder and its data files."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from ..errors import InputImageError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def bundle_root(default: str = ".") -> str:
    """Return the folder of the bundle whose config is being run.

    ``python -m monai.bundle run --config_file bundles/x/configs/inference.json`` may be
    started from any folder; MONAI knows the config folder (``ConfigWorkflow.config_root_path``)
    but does not expose it to the config. This looks for the running workflow on the call
    stack and returns the parent of its ``configs`` folder; outside a workflow (e.g. a plain
    ``ConfigParser``) it returns ``default``. An explicit ``--bundle_root`` override wins anyway.
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigWorkflow):
                root = Path(owner.config_root_path)
                return str((root.parent if root.name == "configs" else root).resolve())
            frame = frame.f_back
    finally:
        del frame
    return default


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted NIfTI files in ``folder``; a clear error if the folder is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputImageError(f"dataset folder does not exist: {folder} (pass --dataset_dir DIR)")
    files = sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise InputImageError(f"no NIfTI files (*.nii, *.nii.gz) in dataset folder {folder}")
    return files


def paired_datalist(dataset_dir: str | os.PathLike, images: str = "images", labels: str = "labels") -> list[dict]:
    """``[{'image', 'label'}]`` for ``dataset_dir/images/*`` paired by file name with ``dataset_dir/labels/*``."""
    root = Path(dataset_dir)
    image_files = list_images(root / images)
    pairs = []
    for image in image_files:
        label = root / labels / Path(image).name
        if not label.is_file():
            raise InputImageError(f"no label for {image}: expected {label}")
        pairs.append({"image": image, "label": str(label)})
    return pairs
