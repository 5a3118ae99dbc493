"""Segmentation networks MONAI does not ship: 3D TransUNet and UNesT."""

from .transunet import TransUNet3D
from .unest import UNesT

__all__ = ["TransUNet3D", "UNesT"]
