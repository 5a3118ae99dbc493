"""Finding a bundle's data files."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputImageError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


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
