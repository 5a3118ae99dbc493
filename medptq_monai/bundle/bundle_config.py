"""Reading an unmodified MONAI bundle (model-zoo layout): its configs, metadata and the ids medptq needs.

Every missing or unusable id raises ``BundleConfigError`` naming the id and the config files, so a
user can fix the bundle (or pass an override) without reading a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from ..errors import BundleConfigError, CalibrationError, MedPTQError

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
META_NAME = "metadata.json"
IN_CHANNELS_ID = "_meta_#network_data_format#inputs#image#num_channels"
OUT_CHANNELS_ID = "_meta_#network_data_format#outputs#pred#num_channels"


@dataclass
class BundleConfig:
    """A parsed bundle: its root folder, the config files merged in order, metadata file and parser."""

    root: Path
    config_files: list[Path]
    meta_file: Path
    parser: ConfigParser

    def where(self) -> str:
        """The config files, for error messages."""
        return ", ".join(str(f) for f in self.config_files)

    def has(self, id: str) -> bool:
        """Whether the merged config defines ``id`` (``#``/``::`` nested ids allowed)."""
        return id in self.parser

    def require(self, id: str, why: str) -> None:
        """Raise ``BundleConfigError`` unless ``id`` is defined; ``why`` says what medptq needs it for."""
        if not self.has(id):
            raise BundleConfigError(f"the bundle config defines no `{id}` ({why}); looked in {self.where()}")

    def parsed(self, id: str, why: str) -> Any:
        """``get_parsed_content(id)``; a missing id or one that fails to build raises ``BundleConfigError``."""
        self.require(id, why)
        try:
            return self.parser.get_parsed_content(id)
        except Exception as err:
            raise BundleConfigError(f"`{id}` in {self.where()} could not be built ({why}): {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        text = f"{text.splitlines()[0]} <- {str(cause).strip().splitlines()[0]}"
    return text.splitlines()[0]


def config_files(root: Path, config_file: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """The bundle's config files: ``config_file`` (one path, a list, or comma-separated, as ``monai.bundle run``
    takes) or else ``configs/inference.json`` (or ``.yaml``). Relative paths are tried from the current
    folder, then from the bundle root."""
    if config_file is None:
        for name in CONFIG_NAMES:
            if (root / "configs" / name).is_file():
                return [root / "configs" / name]
        raise BundleConfigError(f"no configs/{CONFIG_NAMES[0]} (or .yaml) in bundle {root}; pass --config_file")
    if isinstance(config_file, (str, os.PathLike)):
        text = str(config_file)
        names: list[str] = text.split(",") if ("," in text and not Path(text).is_file()) else [text]
    else:
        names = [str(c) for c in config_file]
    files = []
    for name in (n.strip() for n in names):
        path = Path(name)
        if not path.is_file() and not path.is_absolute() and (root / path).is_file():
            path = root / path
        if not path.is_file():
            raise BundleConfigError(f"config file not found: {name}")
        files.append(path.resolve())
    if not files:
        raise BundleConfigError("--config_file is empty")
    return files


def read_bundle(
    bundle_dir: str | os.PathLike,
    config_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    meta_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> BundleConfig:
    """Parse a bundle as ``python -m monai.bundle run`` would: configs merged in order, metadata as ``_meta_``,
    ``overrides`` (``dataset_dir=...``, ``datalist=...``, nested ``a#b`` ids) applied last. ``bundle_root`` is
    the bundle folder unless overridden (zoo configs say ``"."`` or an absolute path of their author's machine).
    """
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise BundleConfigError(f"bundle folder not found: {root}")
    files = config_files(root, config_file)
    meta = Path(meta_file).resolve() if meta_file is not None else root / "configs" / META_NAME
    if not meta.is_file():
        raise BundleConfigError(f"bundle metadata not found: {meta} (pass --meta_file)")
    parser = ConfigParser()
    try:
        parser.read_config([str(f) for f in files])
        parser.read_meta(str(meta))
    except Exception as err:
        raise BundleConfigError(f"cannot read the bundle configs {', '.join(map(str, files))} / {meta}: {err}") from err
    parser.update({"bundle_root": str(root), **overrides})
    return BundleConfig(root, files, meta, parser)


def meta_channels(bundle: BundleConfig) -> tuple[int, int]:
    """(input channels, output channels) from ``_meta_`` ``network_data_format`` ``inputs.image`` / ``outputs.pred``."""
    values = []
    for id in (IN_CHANNELS_ID, OUT_CHANNELS_ID):
        if not bundle.has(id):
            raise BundleConfigError(f"{bundle.meta_file} has no {id.replace('_meta_#', '').replace('#', '.')}")
        value = bundle.parser.get_parsed_content(id)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BundleConfigError(f"{bundle.meta_file}: {id.replace('_meta_#', '').replace('#', '.')} must be a "
                                    f"positive integer, got {value!r}")
        values.append(int(value))
    return values[0], values[1]


def inferer_roi(bundle: BundleConfig, roi_size: Sequence[int] | None = None) -> tuple[tuple[int, int, int], bool]:
    """The patch size the network sees: ``roi_size`` if given, else ``inferer#roi_size``; returns
    (roi, whether it came from the inferer). A missing ``inferer`` or an inferer without a roi raises."""
    bundle.require("inferer", "the sliding-window inferer whose patch size the INT8 model is built for")
    from_inferer = roi_size is None
    if from_inferer:
        if not bundle.has("inferer#roi_size"):
            target = bundle.parser.get("inferer#_target_") if bundle.has("inferer#_target_") else "?"
            raise BundleConfigError(
                f"`inferer` ({target}) in {bundle.where()} has no roi_size, so the patch size of the INT8 model "
                "cannot be derived; pass --roi_size [D,H,W] (the model then only takes patches of that size)"
            )
        roi_size = bundle.parsed("inferer#roi_size", "the patch size of the INT8 model")
    try:
        roi = tuple(int(r) for r in roi_size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        roi = ()
    if len(roi) != 3 or min(roi) < 1:
        source = "inferer#roi_size" if from_inferer else "--roi_size"
        raise BundleConfigError(f"{source} must be 3 positive sizes for a 3D network, got {roi_size!r}")
    return roi, from_inferer  # type: ignore[return-value]


@contextlib.contextmanager
def importable_scripts(root: Path) -> Iterator[None]:
    """Make ``scripts.*`` in ``network_def`` (a bundle's own code) import from ``root/scripts`` while inside.

    ``monai.bundle run`` puts the bundle root on ``sys.path`` only when its ``run`` starts; a tool
    that builds ``network_def`` itself must do it first. A ``scripts`` package already imported
    from elsewhere (another bundle) is dropped from ``sys.modules`` so this bundle's one is used.
    No bytecode is written into the bundle meanwhile.
    """
    loaded = sys.modules.get("scripts")
    if loaded is not None:
        locations = [Path(p).resolve() for p in getattr(loaded, "__path__", [])]
        if (root / "scripts").resolve() not in locations:
            for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
                del sys.modules[name]
    sys.path.insert(0, str(root))
    bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ left in the bundle
    try:
        yield
    finally:
        sys.dont_write_bytecode = bytecode
        with contextlib.suppress(ValueError):
            sys.path.remove(str(root))


def dataset_images(dataset: Any, image_key: str, in_channels: int, bundle: BundleConfig,
                   what: str = "`dataset`") -> Iterator[tuple[Any, Any]]:
    """(item, image) for every item of a bundle's ``dataset``, checked: one channel-first ``[C, D, H, W]``
    volume per item, C = the metadata's input channels. ``what`` names the dataset in errors."""
    for index in range(len(dataset)):
        try:
            item = dataset[index]
        except MedPTQError:
            raise
        except Exception as err:
            raise CalibrationError(f"{what} item {index} could not be loaded through the bundle's "
                                   f"`preprocessing`: {str(err).strip().splitlines()[0]}") from err
        if isinstance(item, list):
            raise CalibrationError(f"{what} item {index} is a list of crops; calibration needs whole volumes "
                                   "(an inference dataset, without random crops)")
        image = item.get(image_key) if isinstance(item, Mapping) else item
        if image is None:
            raise BundleConfigError(f"{what} items have no {image_key!r} key (set `image_key`)")
        name = getattr(image, "meta", {}).get("filename_or_obj", f"item {index}")
        shape = tuple(image.shape)
        if len(shape) != 4:
            raise CalibrationError(f"`preprocessing` gives {name} the shape {shape}; calibration needs channel-first "
                                   "[C, D, H, W] volumes")
        if shape[0] != in_channels:
            raise CalibrationError(
                f"{what} image {name} has {shape[0]} channel(s) after `preprocessing`, but the network takes "
                f"{in_channels} ({bundle.meta_file}: inputs.image.num_channels)"
            )
        yield item, image
