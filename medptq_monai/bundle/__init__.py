"""MONAI bundle components: engine-backed network, transforms, quantizing any bundle and its INT8 overlay."""

from ..export.torch_export import load_checkpoint
from .network import EngineNetwork
from .overlay import SourceCheckedEngineNetwork
from .paths import list_images, paired_datalist
from .quantize_bundle import quantize_bundle
from .transforms import LoadNiftid, RemapLabelsd, SaveLabeld, ValidateImaged

__all__ = [
    "EngineNetwork",
    "LoadNiftid",
    "RemapLabelsd",
    "SaveLabeld",
    "SourceCheckedEngineNetwork",
    "ValidateImaged",
    "load_checkpoint",
    "list_images",
    "paired_datalist",
    "quantize_bundle",
]
