"""MONAI bundle components: engine-backed network, transforms, calibration workflow."""

from .paths import bundle_root, list_images, paired_datalist
from .transforms import LoadNiftid, RemapLabelsd, SaveLabeld, ValidateImaged

__all__ = [
    "LoadNiftid",
    "RemapLabelsd",
    "SaveLabeld",
    "ValidateImaged",
    "bundle_root",
    "list_images",
    "paired_datalist",
]
