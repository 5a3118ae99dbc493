"""Import a trained nnU-Net v2 results folder into a ready-to-calibrate INT8 bundle.

An nnU-Net v2 results folder (``nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>``)
holds ``plans.json``, ``dataset.json`` and ``fold_X/checkpoint_final.pth`` (a dict whose
``network_weights`` is the state dict of the plans' network). :func:`import_nnunet` checks all
of it before writing anything, then writes a bundle rendered from the package's bundle template
(``medptq_monai.bundle.template`` with the nnU-Net ids: plans-driven network, preprocessing and
inferer), the results' ``plans.json`` and ``dataset.json`` in ``configs/``, ``models/model.pt`` (plain
state dict), ``configs/metadata.json`` (classes, channels, patch size) and ``docs/README.md``. The
bundle is built in a temporary folder beside the destination and renamed into place, so a failed
import leaves nothing behind.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import MedPTQError, ModelFileError
from ..fileio import read_json, sha256_file
from ..networks.nnunet import NNUNetPlan, load_plan
from .template import nnunet_ids, render_bundle, template_json

__all__ = [
    "BundleExistsError",
    "DatasetInfo",
    "import_nnunet",
    "load_nnunet_checkpoint",
    "read_dataset_json",
    "state_dict_for_plan",
]

_PREFIXES = ("module.", "_orig_mod.")


class BundleExistsError(MedPTQError, FileExistsError):
    """The destination bundle folder exists and is not empty (pass ``overwrite=True`` to replace it)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the bundle needs from an nnU-Net ``dataset.json``."""

    labels: list[str]  # class index -> name, background first
    channel_names: list[str]  # input channel index -> name
    ignore_label: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)


def read_dataset_json(path: str | os.PathLike) -> DatasetInfo:
    """Labels and channels of an nnU-Net v2 ``dataset.json`` (``labels``: name -> index,
    ``channel_names`` or the older ``modality``). Region-based label sets are refused."""
    path = Path(path)
    data = read_json(path, "nnU-Net dataset.json")
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise ModelFileError(f"{path}: no 'labels' mapping (name -> class index)")
    if data.get("regions_class_order") is not None or any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise ModelFileError(f"{path}: region-based labels (sigmoid outputs) are not supported; the bundle "
                             "takes the argmax of softmax classes")
    ignore = labels.get("ignore")
    classes = {name: v for name, v in labels.items() if name != "ignore"}
    try:
        by_index = {int(v): str(name) for name, v in classes.items()}
    except (TypeError, ValueError):
        raise ModelFileError(f"{path}: label indices must be integers, got {classes}") from None
    if sorted(by_index) != list(range(len(classes))):
        raise ModelFileError(f"{path}: label indices must be 0..{len(classes) - 1} without gaps or duplicates, "
                             f"got {sorted(int(v) for v in classes.values())}")
    channels = data.get("channel_names", data.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise ModelFileError(f"{path}: no 'channel_names' mapping (channel index -> name)")
    try:
        order = sorted(channels, key=int)
    except ValueError:
        raise ModelFileError(f"{path}: channel_names keys must be channel indices, got {list(channels)}") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise ModelFileError(f"{path}: channel_names keys must be 0..{len(order) - 1}, got {order}")
    return DatasetInfo(
        labels=[by_index[i] for i in range(len(by_index))],
        channel_names=[str(channels[k]) for k in order],
        ignore_label=None if ignore is None else int(ignore),
    )


def _numpy_safe_globals() -> list:
    """numpy scalar/array reconstruction helpers nnU-Net checkpoints hold in their logs (safe to unpickle)."""
    core = getattr(np, "_core", None) or np.core
    names = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        names += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return names


def load_nnunet_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
    """Read an nnU-Net checkpoint with ``torch.load(weights_only=True)`` (numpy scalars allowed).

    A file that needs arbitrary unpickling is refused with the offending class named, unless
    ``allow_pickle`` (only for files you trust: unpickling can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ModelFileError(f"checkpoint is empty (0 bytes): {path}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(err), re.DOTALL)
            raise ModelFileError(f"cannot read checkpoint {path} (corrupt or not a torch file): "
                                 f"{(detail.group(1) if detail else str(err))[:200]}") from err
        if not allow_pickle:
            raise ModelFileError(
                f"{path} holds Python objects that torch.load(weights_only=True) refuses ({found.group(1)}); "
                "if you trust this file, import it with allow_pickle=True (CLI: --allow_pickle)"
            ) from err
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as err2:
            raise ModelFileError(f"cannot read checkpoint {path}: {err2}") from err2
    except Exception as err:  # zip/pickle corruption raises many types
        raise ModelFileError(f"cannot read checkpoint {path} (corrupt or not a torch file): {err}") from err
    if not isinstance(ckpt, Mapping):
        raise ModelFileError(f"{path} is not an nnU-Net checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    return dict(ckpt)


def _extract_weights(ckpt: Mapping, path: Path) -> dict[str, torch.Tensor]:
    if "network_weights" in ckpt:
        state = ckpt["network_weights"]
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt  # a plain state dict
    else:
        raise ModelFileError(f"{path} is not an nnU-Net checkpoint: no 'network_weights' entry "
                             f"(top-level keys: {sorted(map(str, ckpt))[:10]})")
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: 'network_weights' is not a state dict of tensors")
    state = {str(k): v for k, v in state.items()}
    for prefix in _PREFIXES:  # DataParallel / torch.compile wrappers
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _deep_supervision_only(keys, network: torch.nn.Module) -> set[str]:
    """Keys of the decoder's lower-resolution segmentation heads: trained only for deep supervision,
    never used by the full-resolution output."""
    heads = getattr(getattr(network, "decoder", None), "seg_layers", None)
    if heads is None or len(heads) < 2:
        return set()
    last = len(heads) - 1
    pattern = re.compile(r"^decoder\.seg_layers\.(\d+)\.")
    return {k for k in keys if (m := pattern.match(k)) and int(m.group(1)) != last}


def state_dict_for_plan(
    state: Mapping[str, torch.Tensor], network: torch.nn.Module, num_classes: int, where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Check ``state`` against ``network`` (built from the plans) and return the state dict to save
    plus the deep-supervision-only keys filled from ``network`` (absent in ``state``).

    Any other missing key, unexpected key or shape difference is a :class:`ModelFileError`.
    """
    expected = network.state_dict()
    heads = [k for k in state if re.match(r"^decoder\.seg_layers\.\d+\.weight$", k)]
    for key in heads:
        if state[key].shape[0] != num_classes:
            raise ModelFileError(f"{where}: the network predicts {state[key].shape[0]} classes ({key}) but "
                                 f"dataset.json lists {num_classes} labels")
    ds_only = _deep_supervision_only(expected, network)
    missing = [k for k in expected if k not in state and k not in ds_only]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs plans {tuple(expected[k].shape)}"
              for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("with other shapes", shapes)):
            if items:
                parts.append(f"{len(items)} {what} (e.g. {', '.join(items[:3])})")
        raise ModelFileError(f"{where} does not match the network built from plans.json: {'; '.join(parts)}")
    filled = sorted(k for k in ds_only if k not in state)
    out = {k: (state[k] if k in state else expected[k]).detach().clone().contiguous() for k in expected}
    return out, filled


def _results_name_parts(results: Path) -> tuple[str, str, str] | None:
    parts = results.name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


def _check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise BundleExistsError(f"destination exists and is not a folder: {dest}")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise BundleExistsError(f"destination bundle folder exists and is not empty: {dest} "
                                "(choose another folder or pass overwrite=True / --overwrite)")


def _fold_dir(results: Path, fold: int | str) -> Path:
    fold_dir = results / f"fold_{fold}"
    if not fold_dir.is_dir():
        found = sorted(p.name for p in results.glob("fold_*") if p.is_dir())
        raise ModelFileError(f"no fold {fold!r} in {results}: {fold_dir.name}/ missing"
                             + (f" (found: {', '.join(found)})" if found else " (no fold_* folders)"))
    return fold_dir


def _write_bundle(tmp: Path, results: Path, plan: NNUNetPlan, info: DatasetInfo,
                  state: dict[str, torch.Tensor], meta_extra: dict) -> None:
    """Fill the (empty) folder ``tmp`` with the imported bundle."""
    # label_map null: reference labels are read in the dataset's own class indices
    render_bundle(tmp, {**nnunet_ids(), "configuration": plan.configuration, "label_map": None})
    configs = tmp / "configs"
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(results / name, configs / name)

    meta = template_json("nnunet_metadata.json")
    scale = plan.ct_scale_range()
    norm = plan.ct_normalization()
    names = " ".join(f"{i} {n}," for i, n in enumerate(info.labels)).rstrip(",")
    origin = f"{meta_extra['dataset_name']} ({results.name}, fold {meta_extra['fold']})"
    meta.update({
        "name": meta_extra["bundle_name"],
        "task": f"nnU-Net v2 segmentation imported from {origin}, with a real INT8 engine",
        "description": (
            f"nnU-Net v2 {plan.network_class_name.rsplit('.', 1)[-1]} imported from the results folder {origin} by "
            "medptq import_nnunet: the plans' network (configs/plans.json, configuration "
            f"{plan.configuration!r}) with its trained weights (models/model.pt), nnU-Net's preprocessing "
            "reproduced in MONAI; `medptq quantize` writes the INT8 QDQ ONNX and configs/inference_int8.json."
        ),
        "data_source": f"nnU-Net v2 results folder {results.name} of {meta_extra['dataset_name']}",
        "image_classes": (f"{info.channel_names[0]} in Hounsfield units, clipped to [{norm['lower']:g}, "
                          f"{norm['upper']:g}] and z-scored (mean {norm['mean']:g}, std {norm['std']:g}): "
                          "nnU-Net CTNormalization from the plans"),
        "label_classes": names,
        "pred_classes": f"{info.num_classes} channels of logits, argmax gives the label map",
        "intended_use": "Research use of an imported nnU-Net model; check INT8 against FP32 on your own data",
        "eval_metrics": {"note": "not measured: run configs/evaluate.json on your labelled data"},
        "nnunet": meta_extra["nnunet"],
    })
    fmt = meta["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    image.update({"num_channels": info.in_channels, "spatial_shape": list(plan.patch_size),
                  "value_range": [round(scale["b_min"], 4), round(scale["b_max"], 4)],
                  "channel_def": {str(i): n for i, n in enumerate(info.channel_names)}})
    pred.update({"num_channels": info.num_classes, "spatial_shape": list(plan.patch_size),
                 "channel_def": {str(i): n for i, n in enumerate(info.labels)}})
    (configs / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")

    readme = tmp / "docs" / "README.md"
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text(_readme(results, plan, info, meta_extra))

    models = tmp / "models"
    models.mkdir()
    torch.save(state, str(models / "model.pt"))


def _readme(results: Path, plan: NNUNetPlan, info: DatasetInfo, meta_extra: dict) -> str:
    """The imported bundle's ``docs/README.md``: where it came from and how to quantize and run it."""
    name, nnunet = meta_extra["bundle_name"], meta_extra["nnunet"]
    return (
        f"# {name} — imported nnU-Net v2 model\n\n"
        f"Imported by `medptq import_nnunet` (medptq-monai {__version__}) on {nnunet['imported_at']} from the results "
        f"folder `{results.name}` (fold {meta_extra['fold']}, `{nnunet['checkpoint']}`, sha256 "
        f"`{nnunet['checkpoint_sha256']}`): {info.num_classes} classes ({', '.join(info.labels)}), patch "
        f"{'x'.join(map(str, plan.patch_size))}, spacing {plan.spacing} (nnU-Net axis order), configuration "
        f"`{plan.configuration}`. `label_map` is `null`: labels for evaluation and training are read in this "
        "dataset's own class indices.\n\n"
        "## Use\n\n"
        "Quantize (writes `models/model.onnx`, `models/model_int8.onnx` and the overlay "
        "`configs/inference_int8.json`), then segment with the INT8 engine (`--engine`, `--precision fp32` for the "
        "FP32 ONNX); `configs/inference.json` alone is the FP32 torch model:\n\n"
        "```bash\n"
        f"medptq quantize {name} --dataset_dir CALIBRATION_CT_DIR\n"
        f"python -m monai.bundle run --config_file \"['{name}/configs/inference.json','{name}/configs/inference_int8.json']\" "
        f"--bundle_root {name} --dataset_dir CT_DIR --output_dir OUT\n"
        "```\n\n"
        "`configs/evaluate.json` (after those configs) reports Dice against `dataset_dir/labels`; "
        "`medptq sensitivity` lists the layers to keep in float (metadata `quantization.float_layers`).\n"
    )


def import_nnunet(
    results_dir: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    fold: int | str = 0,
    configuration: str | None = None,
    checkpoint: str = "checkpoint_final.pth",
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Import a trained nnU-Net v2 results folder into a ready bundle at ``bundle_dir``.

    ``results_dir`` is the trainer folder ``<trainer>__<plans>__<configuration>`` holding
    ``plans.json``, ``dataset.json`` and ``fold_<fold>/<checkpoint>``. ``configuration`` defaults to
    the folder name's last part, else ``3d_fullres``. Everything is checked before anything is
    written; an existing non-empty ``bundle_dir`` is refused unless ``overwrite``. Returns a summary.
    """
    results, dest = Path(results_dir), Path(bundle_dir)
    if not results.is_dir():
        raise ModelFileError(f"nnU-Net results folder not found: {results}")
    _check_destination(dest, overwrite)
    for name in ("plans.json", "dataset.json"):
        if not (results / name).is_file():
            raise ModelFileError(
                f"no {name} in {results}: expected an nnU-Net v2 results folder "
                "(<trainer>__<plans>__<configuration>/ with plans.json, dataset.json and fold_X/)"
            )
    name_parts = _results_name_parts(results)
    if configuration is None:
        configuration = name_parts[2] if name_parts else "3d_fullres"
    plan = load_plan(results / "plans.json", configuration)
    plan.ct_normalization(0)  # CT models only: fails here, before anything is written
    info = read_dataset_json(results / "dataset.json")
    if info.in_channels != 1:
        raise ModelFileError(f"{results / 'dataset.json'}: {info.in_channels} input channels "
                             f"{info.channel_names}; the bundle reads one CT image per case")
    if len(plan.normalization_schemes) != info.in_channels:
        raise ModelFileError(f"{results / 'plans.json'}: {len(plan.normalization_schemes)} normalization schemes "
                             f"for {info.in_channels} input channel(s) in dataset.json")
    if info.num_classes < 2:
        raise ModelFileError(f"{results / 'dataset.json'}: needs background and at least one class")

    fold_dir = _fold_dir(results, fold)
    ckpt_path = fold_dir / checkpoint
    if not ckpt_path.is_file():
        found = sorted(p.name for p in fold_dir.glob("*.pth"))
        raise ModelFileError(f"checkpoint not found: {ckpt_path}" + (f" (found: {', '.join(found)})" if found else ""))
    ckpt = load_nnunet_checkpoint(ckpt_path, allow_pickle=allow_pickle)
    init_args = ckpt.get("init_args") if isinstance(ckpt.get("init_args"), Mapping) else {}
    trained_config = init_args.get("configuration")
    if trained_config is not None and str(trained_config) != configuration:
        raise ModelFileError(f"{ckpt_path} was trained with configuration {trained_config!r}, not {configuration!r} "
                             f"(pass configuration={trained_config!r})")
    weights = _extract_weights(ckpt, ckpt_path)
    network = plan.build_network(info.in_channels, info.num_classes, deep_supervision=False)
    state, filled = state_dict_for_plan(weights, network, info.num_classes, where=f"checkpoint {ckpt_path}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelFileError(f"checkpoint {ckpt_path}: NaN/Inf in {len(bad)} tensor(s), e.g. {', '.join(bad[:3])}")
    network.load_state_dict(state)

    trainer = str(ckpt.get("trainer_name") or (name_parts[0] if name_parts else ""))
    epoch = ckpt.get("current_epoch")
    nnunet_meta = {
        "dataset_name": plan.dataset_name,
        "plans_name": plan.plans_name or (name_parts[1] if name_parts else ""),
        "trainer": trainer,
        "configuration": plan.configuration,
        "fold": fold,
        "checkpoint": f"{fold_dir.name}/{checkpoint}",
        "checkpoint_sha256": sha256_file(ckpt_path),
        "epochs_trained": int(epoch) if isinstance(epoch, (int, np.integer)) else None,
        "network_class_name": plan.network_class_name,
        "patch_size": plan.patch_size,
        "spacing": plan.spacing,
        "transpose_forward": plan.transpose_forward,
        "deep_supervision_keys_filled": filled,
        "imported_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "imported_with": f"medptq-monai {__version__}",
    }
    extra = {"bundle_name": dest.name, "dataset_name": plan.dataset_name or results.parent.name, "fold": fold,
             "nnunet": nnunet_meta}

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.importing-", dir=dest.parent))
    try:
        _write_bundle(tmp, results, plan, info, state, extra)
        _check_destination(dest, overwrite)  # again: it may have appeared meanwhile
        old = None
        if dest.exists():  # an empty folder, or overwrite: set it aside until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.replaced-", dir=dest.parent))
            os.rmdir(old)
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except BaseException:
            if old is not None:
                os.replace(old, dest)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "bundle_dir": str(dest.resolve()),
        "results_dir": str(results.resolve()),
        "dataset_name": plan.dataset_name,
        "trainer": trainer,
        "configuration": plan.configuration,
        "fold": fold,
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256": nnunet_meta["checkpoint_sha256"],
        "epochs_trained": nnunet_meta["epochs_trained"],
        "network": plan.network_class_name.rsplit(".", 1)[-1],
        "parameters": int(sum(v.numel() for v in network.parameters())),
        "in_channels": info.in_channels,
        "num_classes": info.num_classes,
        "labels": info.labels,
        "patch_size": plan.patch_size,
        "spacing": plan.spacing,
        "pixdim": plan.monai_pixdim,
        "deep_supervision_keys_filled": len(filled),
    }
