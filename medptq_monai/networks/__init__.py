"""Segmentation networks MONAI does not ship (3D TransUNet, UNesT), the VISTA3D class-prompt wrapper and
nnU-Net v2 networks built from a plans file."""

from .nnunet import NNUNetPlan, load_plan, network_from_plans
from .transunet import TransUNet3D
from .unest import UNesT
from .vista3d import Vista3DSegmenter

__all__ = ["NNUNetPlan", "TransUNet3D", "UNesT", "Vista3DSegmenter", "load_plan", "network_from_plans"]
