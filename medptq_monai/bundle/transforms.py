"""MONAI dictionary transforms used by the bundle configs."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform

from ..errors import InputImageError
from ..fileio import atomic_path


def _source_name(data: Mapping, key: Hashable) -> str:
    value = data.get(key)
    meta = getattr(value, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<in-memory image>"))


class LoadNiftid(LoadImaged):
    """``LoadImaged`` with nibabel that turns unreadable or empty files into ``InputImageError``."""

    def __init__(self, keys: KeysCollection, **kwargs) -> None:
        kwargs.setdefault("reader", "NibabelReader")
        super().__init__(keys, **kwargs)

    def __call__(self, data, reader=None):
        for key in self.key_iterator(dict(data)):
            path = data[key]
            if isinstance(path, (str, os.PathLike)):
                path = Path(path)
                if not path.is_file():
                    raise InputImageError(f"image file not found: {path}")
                if path.stat().st_size == 0:
                    raise InputImageError(f"image file is empty (0 bytes): {path}")
        try:
            out = super().__call__(data, reader)
        except InputImageError:
            raise
        except Exception as err:  # nibabel/gzip raise many types for corrupt files
            names = [str(data[k]) for k in self.key_iterator(dict(data))]
            raise InputImageError(f"cannot read NIfTI {', '.join(names)}: {err}") from err
        for key in self.key_iterator(out):
            if out[key].numel() == 0:
                raise InputImageError(f"image has no voxels (shape {tuple(out[key].shape)}): {data[key]}")
        return out


class ValidateImaged(MapTransform):
    """Check channel-first images: rank ``1 + spatial_dims``, ``num_channels`` channels, finite voxels."""

    def __init__(
        self, keys: KeysCollection, num_channels: int = 1, spatial_dims: int = 3, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_channels = int(num_channels)
        self.spatial_dims = int(spatial_dims)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = _source_name(d, key)
            shape = tuple(img.shape)
            if len(shape) != self.spatial_dims + 1:
                raise InputImageError(
                    f"{name}: expected a {self.spatial_dims}D image with a channel axis "
                    f"(rank {self.spatial_dims + 1}), got shape {shape}"
                )
            if shape[0] != self.num_channels:
                raise InputImageError(f"{name}: expected {self.num_channels} channel(s), got {shape[0]} (shape {shape})")
            if min(shape) == 0:
                raise InputImageError(f"{name}: image has an empty axis (shape {shape})")
            arr = torch.as_tensor(img)
            if arr.is_floating_point() and not bool(torch.isfinite(arr).all()):
                bad = int((~torch.isfinite(arr)).sum())
                raise InputImageError(f"{name}: image holds {bad} NaN/Inf voxel(s)")
        return d


class RemapLabelsd(MapTransform):
    """Map label values through ``mapping`` (source value → target class); unmapped values become 0.

    ``mapping=None`` leaves labels unchanged (data already in the model's class indices).
    """

    def __init__(self, keys: KeysCollection, mapping: Mapping | None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mapping = None if mapping is None else {int(k): int(v) for k, v in mapping.items()}

    def __call__(self, data):
        d = dict(data)
        if self.mapping is None:
            return d
        for key in self.key_iterator(d):
            lab = d[key]
            arr = torch.as_tensor(lab).long()
            if arr.numel() and int(arr.min()) < 0:
                raise InputImageError(f"{_source_name(d, key)}: negative label values")
            size = max(int(arr.max()) + 1 if arr.numel() else 1, max(self.mapping) + 1)
            table = torch.zeros(size, dtype=torch.long)
            for src, dst in self.mapping.items():
                table[src] = dst
            out = table[arr].to(torch.uint8 if max(self.mapping.values()) < 256 else torch.int16)
            if hasattr(lab, "copy_meta_from"):
                out = type(lab)(out, meta=lab.meta, applied_operations=lab.applied_operations)
            d[key] = out
        return d


def label_path(output_dir: str | os.PathLike, source: str | os.PathLike, suffix: str = "_seg") -> Path:
    """Where ``SaveLabeld`` writes the label of ``source``: ``<output_dir>/<stem><suffix>.nii.gz``."""
    name = Path(source).name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
    return Path(output_dir) / f"{stem}{suffix}.nii.gz"


class SaveLabeld(MapTransform):
    """Write a label map as NIfTI with the *source file's* shape and affine, atomically.

    The label must already be back on the source grid (``Invertd``). The output is
    ``<output_dir>/<source stem><suffix>.nii.gz``; it is written to a temporary file and
    renamed, so a failed case never leaves a partial file.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        image_key: str = "image",
        suffix: str = "_seg",
        dtype: str = "uint8",
    ) -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.suffix = suffix
        self.dtype = np.dtype(dtype)

    def output_path(self, source: str | os.PathLike) -> Path:
        return label_path(self.output_dir, source, self.suffix)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            source = _source_name(d, key)
            if source.startswith("<"):
                source = _source_name(d, self.image_key)
            src = nib.load(source)
            label = np.asarray(torch.as_tensor(d[key]).detach().cpu())
            if label.ndim == len(src.shape) + 1 and label.shape[0] == 1:
                label = label[0]
            if tuple(label.shape) != tuple(src.shape[:3]):
                raise InputImageError(
                    f"{source}: label shape {label.shape} does not match the input's {src.shape[:3]}; "
                    "the postprocessing must invert the preprocessing (Invertd) before saving"
                )
            info = np.iinfo(self.dtype)
            if label.size and (label.min() < info.min or label.max() > info.max):
                raise InputImageError(f"{source}: label values do not fit {self.dtype}")
            header = src.header.copy()
            header.set_data_dtype(self.dtype)
            out = nib.Nifti1Image(label.astype(self.dtype), src.affine, header)
            out.set_sform(src.affine, code=int(src.header["sform_code"]) or 1)
            out.set_qform(src.affine, code=int(src.header["qform_code"]) or 1)
            header["scl_slope"], header["scl_inter"] = 1.0, 0.0
            target = self.output_path(source)
            with atomic_path(target) as tmp:
                nib.save(out, str(tmp))
            d[f"{key}_path"] = str(target)
        return d


def load_remapped_label(path: str | os.PathLike, mapping: Mapping | None) -> np.ndarray:
    """A label NIfTI as an array (source grid) with ``mapping`` applied as in ``RemapLabelsd``."""
    arr = np.asarray(nib.load(str(path)).dataobj).astype(np.int64)
    return np.asarray(RemapLabelsd("label", mapping)({"label": torch.from_numpy(arr)})["label"])
