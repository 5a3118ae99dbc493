"""nnU-Net v2 networks built from a plans file, and what the bundle preprocessing reads from it.

The network is ``dynamic_network_architectures``' own class (``PlainConvUNet`` or
``ResidualEncoderUNet``), built from ``configurations -> <name> -> architecture`` of an nnU-Net
v2 ``plans.json`` (``network_class_name``, ``arch_kwargs``, ``_kw_requires_import``), or from
the older flat keys (``UNet_class_name``, ``UNet_base_num_features``, ``n_conv_per_stage_encoder``,
...), with deep supervision off: one full-resolution output, as nnU-Net predicts. Its state-dict
keys are the class's own, so an nnU-Net checkpoint's ``network_weights`` load unchanged.

Axis order. nnU-Net reads an image as the array of its own voxel grid in SimpleITK order
(z, y, x) (its nibabel reader transposes to the same), then permutes it by the plans'
``transpose_forward``; ``patch_size`` and ``spacing`` are given in that permuted order.
MONAI/nibabel load (x, y, z) of the same grid. So nnU-Net axis ``i`` is MONAI spatial axis
``2 - transpose_forward[i]``: :attr:`NNUNetPlan.monai_pixdim` is the target spacing on the
image's own axes (for ``Spacingd`` without ``Orientationd``) and
:attr:`NNUNetPlan.monai_transpose` the channel-first permutation (``Transposed``) that puts a
MONAI array into nnU-Net's order before the network; ``Invertd`` undoes both.
"""

from __future__ import annotations

import copy
import os
import pydoc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ModelFileError
from ..fileio import read_json

__all__ = [
    "SUPPORTED_NETWORKS",
    "NNUNetPlan",
    "load_plan",
    "load_plans",
    "network_from_plans",
    "resolve_configuration",
    "strides_product",
]

#: network classes this module builds: short name -> class path in dynamic_network_architectures 0.4
SUPPORTED_NETWORKS = {
    "PlainConvUNet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}
#: keys of the nnU-Net CT normalization statistics (``foreground_intensity_properties_per_channel``)
CT_STATS = ("percentile_00_5", "percentile_99_5", "mean", "std")
#: flat (pre-``architecture``) plans keys that describe the network
_OLD_KEYS = ("UNet_class_name", "UNet_base_num_features", "n_conv_per_stage_encoder", "n_conv_per_stage_decoder",
             "conv_kernel_sizes", "pool_op_kernel_sizes", "unet_max_num_features")


def load_plans(plans: str | os.PathLike | Mapping) -> dict:
    """The plans as a dict: a ``plans.json`` path (read and checked) or an already loaded mapping."""
    if isinstance(plans, Mapping):
        data = copy.deepcopy(dict(plans))
        where = "<plans dict>"
    else:
        where = str(plans)
        data = read_json(plans, "nnU-Net plans file")
    if not isinstance(data, dict) or not isinstance(data.get("configurations"), dict) or not data["configurations"]:
        raise ModelFileError(f"{where} is not an nnU-Net v2 plans file: no 'configurations' mapping")
    return data


def resolve_configuration(plans: Mapping, configuration: str, where: str = "plans") -> dict:
    """Configuration ``configuration`` with ``inherits_from`` resolved and the network described
    under ``architecture`` (older flat keys are converted)."""
    configs = plans["configurations"]
    chain: list[str] = []
    name = configuration
    while True:
        if name not in configs:
            if not chain:
                raise ModelFileError(
                    f"{where}: unknown nnU-Net configuration {name!r}; the plans define {sorted(configs)}"
                )
            raise ModelFileError(f"{where}: configuration {chain[-1]!r} inherits from unknown {name!r}")
        if name in chain:
            raise ModelFileError(f"{where}: circular 'inherits_from' chain {' -> '.join([*chain, name])}")
        chain.append(name)
        if not isinstance(configs[name], dict):
            raise ModelFileError(f"{where}: configuration {name!r} is not a mapping")
        parent = configs[name].get("inherits_from")
        if parent is None:
            break
        name = parent
    merged: dict = {}
    for name in reversed(chain):  # base first, the requested configuration last
        merged.update(copy.deepcopy(configs[name]))
    merged.pop("inherits_from", None)
    if "architecture" not in merged:
        merged["architecture"] = _architecture_from_old_keys(merged, configuration, where)
    return merged


def _architecture_from_old_keys(config: Mapping, configuration: str, where: str) -> dict:
    """The ``architecture`` entry nnU-Net v2 derives from the flat keys of older plans."""
    missing = [k for k in _OLD_KEYS if k not in config]
    if missing:
        raise ModelFileError(
            f"{where}: configuration {configuration!r} has no 'architecture' entry and lacks the older "
            f"network keys {missing}"
        )
    stages = len(config["n_conv_per_stage_encoder"])
    base, top = int(config["UNet_base_num_features"]), int(config["unet_max_num_features"])
    dims = len(config["conv_kernel_sizes"][0])
    class_name = str(config["UNet_class_name"])
    per_stage = "n_blocks_per_stage" if class_name == "ResidualEncoderUNet" else "n_conv_per_stage"
    return {
        "network_class_name": class_name,
        "arch_kwargs": {
            "n_stages": stages,
            "features_per_stage": [min(base * 2**i, top) for i in range(stages)],
            "conv_op": f"torch.nn.Conv{dims}d",
            "kernel_sizes": copy.deepcopy(config["conv_kernel_sizes"]),
            "strides": copy.deepcopy(config["pool_op_kernel_sizes"]),
            per_stage: copy.deepcopy(config["n_conv_per_stage_encoder"]),
            "n_conv_per_stage_decoder": copy.deepcopy(config["n_conv_per_stage_decoder"]),
            "conv_bias": True,
            "norm_op": f"torch.nn.InstanceNorm{dims}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _network_class(name: str, where: str) -> type[torch.nn.Module]:
    short = str(name).rsplit(".", 1)[-1]
    foreign = "." in str(name) and not str(name).startswith("dynamic_network_architectures.")
    if short not in SUPPORTED_NETWORKS or foreign:
        raise ModelFileError(
            f"{where}: unsupported nnU-Net network class {name!r}; supported: "
            f"{', '.join(SUPPORTED_NETWORKS.values())}"
        )
    cls = pydoc.locate(SUPPORTED_NETWORKS[short])
    if cls is None:  # pragma: no cover - the package is a dependency
        raise ModelFileError(f"cannot import {SUPPORTED_NETWORKS[short]}: is dynamic-network-architectures installed?")
    return cls


def _torch_nn_object(key: str, name: Any, where: str) -> Any:
    """Resolve a dotted ``torch.nn`` name from ``_kw_requires_import`` (nothing outside torch.nn)."""
    if name is None:
        return None
    if not isinstance(name, str) or not name.startswith("torch.nn."):
        raise ModelFileError(f"{where}: arch_kwargs[{key!r}] must name a torch.nn class, got {name!r}")
    obj = pydoc.locate(name)
    if obj is None:
        raise ModelFileError(f"{where}: arch_kwargs[{key!r}] = {name!r} does not exist in this torch")
    return obj


def _int_list(value: Any, what: str, where: str, length: int = 3) -> list[int]:
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ModelFileError(f"{where}: {what} must be a list of {length} integers, got {value!r}") from None
    if len(out) != length or any(v < 1 for v in out) or any(float(v) != float(o) for v, o in zip(value, out)):
        raise ModelFileError(f"{where}: {what} must be a list of {length} positive integers, got {value!r}")
    return out


@dataclass(frozen=True)
class NNUNetPlan:
    """One 3D configuration of an nnU-Net v2 plans file, with the values the bundle needs.

    ``patch_size``/``spacing`` are in nnU-Net's axis order (see the module docstring); the
    ``monai_*`` properties map them to the image's own axes as MONAI loads them.
    """

    configuration: str
    network_class_name: str
    arch_kwargs: dict
    kw_requires_import: tuple[str, ...]
    patch_size: list[int]
    spacing: list[float]
    transpose_forward: list[int]
    normalization_schemes: list[str]
    intensity_properties: dict = field(default_factory=dict)
    dataset_name: str = ""
    plans_name: str = ""
    source: str = "<plans dict>"

    @property
    def monai_axes(self) -> list[int]:
        """For each nnU-Net axis ``i``, the MONAI (nibabel x, y, z) spatial axis it is."""
        return [2 - t for t in self.transpose_forward]

    @property
    def monai_pixdim(self) -> list[float]:
        """Target spacing on the image's own (x, y, z) axes: for ``Spacingd`` without ``Orientationd``."""
        pixdim = [0.0, 0.0, 0.0]
        for i, axis in enumerate(self.monai_axes):
            pixdim[axis] = float(self.spacing[i])
        return pixdim

    @property
    def monai_transpose(self) -> list[int]:
        """``Transposed`` indices taking a channel-first MONAI array [C, x, y, z] to nnU-Net's order."""
        return [0, *[1 + axis for axis in self.monai_axes]]

    @property
    def num_stages(self) -> int:
        return int(self.arch_kwargs.get("n_stages", 0))

    def ct_normalization(self, channel: int = 0) -> dict[str, float]:
        """nnU-Net's ``CTNormalization`` of ``channel``: clip to [lower, upper], then (x - mean) / std."""
        schemes = self.normalization_schemes
        if channel >= len(schemes):
            raise ModelFileError(f"{self.source}: no normalization scheme for channel {channel} ({schemes})")
        if schemes[channel] != "CTNormalization":
            raise ModelFileError(
                f"{self.source}: channel {channel} uses {schemes[channel]!r}; this bundle reproduces nnU-Net's "
                "'CTNormalization' only (CT models)"
            )
        props = self.intensity_properties.get(str(channel), self.intensity_properties.get(channel))
        if not isinstance(props, Mapping) or any(k not in props for k in CT_STATS):
            raise ModelFileError(
                f"{self.source}: foreground_intensity_properties_per_channel[{str(channel)!r}] must hold "
                f"{', '.join(CT_STATS)} for CTNormalization, got {props!r}"
            )
        try:
            lower, upper, mean, std = (float(props[k]) for k in CT_STATS)
        except (TypeError, ValueError) as err:
            raise ModelFileError(f"{self.source}: CT intensity statistics must be numbers: {err}") from None
        if not lower < upper:
            raise ModelFileError(f"{self.source}: CT clip range needs percentile_00_5 < percentile_99_5, got "
                                 f"{lower} >= {upper}")
        return {"lower": lower, "upper": upper, "mean": mean, "std": max(std, 1e-8)}

    def ct_scale_range(self, channel: int = 0) -> dict[str, float]:
        """``ScaleIntensityRanged`` arguments (with ``clip=True``) equal to nnU-Net's CT normalization:
        the clip window [lower, upper] mapped linearly onto [(lower - mean)/std, (upper - mean)/std]."""
        n = self.ct_normalization(channel)
        return {"a_min": n["lower"], "a_max": n["upper"],
                "b_min": (n["lower"] - n["mean"]) / n["std"], "b_max": (n["upper"] - n["mean"]) / n["std"]}

    def build_network(self, in_channels: int, num_classes: int, deep_supervision: bool = False,
                      initialize: bool = True) -> torch.nn.Module:
        """The ``dynamic_network_architectures`` network of this configuration (nnU-Net's weight
        initialisation when ``initialize``)."""
        if int(in_channels) < 1 or int(num_classes) < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        cls = _network_class(self.network_class_name, self.source)
        kwargs = dict(self.arch_kwargs)
        for key in self.kw_requires_import:
            if key in kwargs:
                kwargs[key] = _torch_nn_object(key, kwargs[key], self.source)
        for key in ("input_channels", "num_classes", "deep_supervision"):
            kwargs.pop(key, None)
        try:
            net = cls(input_channels=int(in_channels), num_classes=int(num_classes),
                      deep_supervision=bool(deep_supervision), **kwargs)
        except (TypeError, ValueError, AssertionError, KeyError, IndexError) as err:
            raise ModelFileError(
                f"{self.source}: configuration {self.configuration!r} arch_kwargs do not build a "
                f"{cls.__name__}: {err}"
            ) from err
        if initialize and hasattr(net, "initialize"):
            net.apply(net.initialize)
        return net


def load_plan(plans: str | os.PathLike | Mapping, configuration: str = "3d_fullres") -> NNUNetPlan:
    """Read and check one 3D configuration of an nnU-Net v2 plans file (path or dict)."""
    data = load_plans(plans)
    where = "<plans dict>" if isinstance(plans, Mapping) else str(plans)
    config = resolve_configuration(data, configuration, where)
    if config.get("previous_stage"):
        raise ModelFileError(
            f"{where}: configuration {configuration!r} is a cascade stage (needs the segmentation of "
            f"{config['previous_stage']!r} as input); only single-stage configurations are supported"
        )
    arch = config["architecture"]
    if not isinstance(arch, Mapping) or not isinstance(arch.get("arch_kwargs"), Mapping) \
            or "network_class_name" not in arch:
        raise ModelFileError(f"{where}: configuration {configuration!r}: 'architecture' needs "
                             "'network_class_name' and an 'arch_kwargs' mapping")
    _network_class(arch["network_class_name"], where)  # unsupported class: fail early
    if "patch_size" not in config or "spacing" not in config:
        raise ModelFileError(f"{where}: configuration {configuration!r} lacks 'patch_size' or 'spacing'")
    if not isinstance(config["patch_size"], (list, tuple)):
        raise ModelFileError(f"{where}: patch_size must be a list, got {config['patch_size']!r}")
    if len(config["patch_size"]) != 3:
        raise ModelFileError(
            f"{where}: configuration {configuration!r} is {len(config['patch_size'])}D (patch "
            f"{config['patch_size']}); only 3D configurations are supported"
        )
    patch = _int_list(config["patch_size"], "patch_size", where)
    try:
        spacing = [float(s) for s in config["spacing"]]
    except (TypeError, ValueError):
        raise ModelFileError(f"{where}: spacing must be 3 positive numbers, got {config['spacing']!r}") from None
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ModelFileError(f"{where}: spacing must be 3 positive numbers, got {config['spacing']!r}")
    transpose = data.get("transpose_forward", [0, 1, 2])
    if (not isinstance(transpose, (list, tuple)) or not all(isinstance(t, int) for t in transpose)
            or sorted(transpose) != [0, 1, 2]):
        raise ModelFileError(f"{where}: transpose_forward must be a permutation of [0, 1, 2], got {transpose!r}")
    props = data.get("foreground_intensity_properties_per_channel",
                     data.get("foreground_intensity_properties_by_modality", {}))
    plan = NNUNetPlan(
        configuration=configuration,
        network_class_name=str(arch["network_class_name"]),
        arch_kwargs=dict(arch["arch_kwargs"]),
        kw_requires_import=tuple(arch.get("_kw_requires_import", ())),
        patch_size=patch,
        spacing=spacing,
        transpose_forward=[int(t) for t in transpose],
        normalization_schemes=list(config.get("normalization_schemes", [])),
        intensity_properties=dict(props) if isinstance(props, Mapping) else {},
        dataset_name=str(data.get("dataset_name", "")),
        plans_name=str(data.get("plans_name", "")),
        source=where,
    )
    try:
        step = strides_product(plan)
    except (TypeError, ValueError):
        raise ModelFileError(f"{where}: arch_kwargs 'strides' must be a list of ints or of 3-int lists") from None
    if any(p % s for p, s in zip(patch, step)):
        raise ModelFileError(f"{where}: patch_size {patch} is not a multiple of the network's total "
                             f"downsampling {step} (configuration {configuration!r})")
    return plan


def network_from_plans(
    plans: str | os.PathLike | Mapping,
    configuration: str = "3d_fullres",
    in_channels: int = 1,
    num_classes: int = 2,
    deep_supervision: bool = False,
    initialize: bool = True,
) -> torch.nn.Module:
    """The nnU-Net v2 network of ``configuration`` in ``plans`` (inference: deep supervision off).

    Usable as a bundle ``network_def``: ``{"_target_": "medptq_monai.networks.nnunet.network_from_plans",
    "plans": "@plans_file", "configuration": "@configuration", ...}``.
    """
    return load_plan(plans, configuration).build_network(in_channels, num_classes, deep_supervision, initialize)


def strides_product(plan: NNUNetPlan) -> list[int]:
    """Per nnU-Net axis, the total downsampling of the encoder (input sizes must be multiples of it)."""
    out = [1, 1, 1]
    strides: Sequence = plan.arch_kwargs.get("strides", [])
    for s in strides:
        s = [s] * 3 if isinstance(s, int) else list(s)
        out = [o * int(v) for o, v in zip(out, s)]
    return out
