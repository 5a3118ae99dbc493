"""Writing one label map as NIfTI on the source's grid, atomically (temporary name, then rename)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from ..errors import InputImageError
from ..fileio import atomic_path, sha256_file

SUFFIX = "_seg.nii.gz"


def output_path(output_dir: str | os.PathLike, case_id: str) -> Path:
    """Where the label of ``case_id`` goes: ``<output_dir>/<case_id>_seg.nii.gz``."""
    return Path(output_dir) / f"{case_id}{SUFFIX}"


def temporary_leftovers(output_dir: str | os.PathLike) -> list[Path]:
    """Temporary files of ``atomic_path`` for label outputs (``.<case>_seg.nii.gz.*.tmp.nii.gz``): what a worker
    killed while writing leaves behind."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if fnmatch.fnmatch(p.name, f".*{SUFFIX}.*.tmp*"))


def label_array(pred: Any) -> np.ndarray:
    """The postprocessed prediction as an integer 3D array (a leading channel of 1 is dropped)."""
    arr = np.asarray(torch.as_tensor(pred).detach().cpu())
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise InputImageError(f"the bundle's postprocessing gave shape {arr.shape}, not a 3D label map")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise InputImageError("the bundle's postprocessing gave non-integer values, not a label map")
    if arr.size:
        low, high = int(arr.min()), int(arr.max())
        for dtype in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return arr.astype(dtype)
    return arr.astype(np.int32)


def write_label(pred: Any, dest: Path, reference: str | None, affine: np.ndarray | None,
                spatial_shape: tuple[int, ...] | None) -> str:
    """Write ``pred`` to ``dest`` atomically and return its sha256.

    ``reference``: a NIfTI input whose header (affine, codes, zooms) the label keeps; otherwise (DICOM) the
    ``affine`` MONAI's reader gave the source. The label must have the source's ``spatial_shape``.
    """
    label = label_array(pred)
    if reference is not None:
        src = nib.load(reference)
        shape = tuple(int(s) for s in src.shape[:3])
        header = src.header.copy()
        header.set_data_dtype(label.dtype)
        header["scl_slope"], header["scl_inter"] = 1.0, 0.0
        header.set_data_shape(label.shape)
        image = nib.Nifti1Image(label, src.affine, header)
        image.set_sform(src.affine, code=int(src.header["sform_code"]) or 1)
        image.set_qform(src.affine, code=int(src.header["qform_code"]) or 1)
    else:
        if affine is None:
            raise InputImageError("the source's affine is unknown (the bundle's loader kept no metadata)")
        shape = tuple(int(s) for s in spatial_shape) if spatial_shape is not None else label.shape
        image = nib.Nifti1Image(label, np.asarray(affine, dtype=np.float64))
        image.set_sform(image.affine, code=1)
        image.set_qform(image.affine, code=1)
    if tuple(label.shape) != shape:
        raise InputImageError(f"label shape {label.shape} is not the source's {shape}: the bundle's postprocessing "
                              "must invert its preprocessing (Invertd)")
    with atomic_path(dest) as tmp:
        nib.save(image, str(tmp))
        digest = sha256_file(tmp)
    return digest
