"""MONAI bundle components: engine-backed network, transforms, calibration workflow."""

from ..export.torch_export import load_checkpoint
from .calibration import BundleCalibrator, capped_roi
from .network import EngineNetwork
from .paths import bundle_root, list_images, paired_datalist
from .transforms import LoadNiftid, RemapLabelsd, SaveLabeld, ValidateImaged

__all__ = [
    "BundleCalibrator",
    "EngineNetwork",
    "LoadNiftid",
    "RemapLabelsd",
    "SaveLabeld",
    "ValidateImaged",
    "bundle_root",
    "capped_roi",
    "load_checkpoint",
    "list_images",
    "paired_datalist",
]
