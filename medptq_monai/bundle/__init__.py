"""MONAI bundle components: engine-backed network, transforms, calibration workflow, quantizing any bundle."""

from ..export.torch_export import load_checkpoint
from .calibration import BundleCalibrator, capped_roi
from .network import EngineNetwork
from .overlay import SourceCheckedEngineNetwork
from .paths import list_images, paired_datalist
from .quantize_bundle import quantize_bundle
from .transforms import LoadNiftid, RemapLabelsd, SaveLabeld, ValidateImaged

__all__ = [
    "BundleCalibrator",
    "EngineNetwork",
    "LoadNiftid",
    "RemapLabelsd",
    "SaveLabeld",
    "SourceCheckedEngineNetwork",
    "ValidateImaged",
    "capped_roi",
    "load_checkpoint",
    "list_images",
    "paired_datalist",
    "quantize_bundle",
]
