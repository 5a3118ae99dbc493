"""The one bundle template behind our seven bundles and ``medptq import_nnunet``.

The template (package data in ``template_files/``, so it ships in the wheel) holds what every medptq
bundle shares: ``LICENSE``, ``configs/{evaluate,inference_fp32,train}.json``, ``configs/logging.conf``
(copied byte for byte) and ``configs/inference.json``: an ordinary FP32 MONAI inference config
(``network`` is ``network_def`` on ``device``, a ``CheckpointLoader`` loads ``models_dir/model.pt``,
``bundle_root`` ``"."``). ``configs/inference_int8.json`` is the same overlay ``medptq quantize`` writes for
any bundle (``overlay.render_overlay``): our bundles are ordinary bundles plus that overlay. A bundle
keeps only what differs: the values of the ids in ``OWN_IDS`` (network, roi, spacing, window, labels,
...) and ids of its own that the template lacks, in its ``configs/inference.json``; plus its metadata,
docs, weights and extra overlays.

``render_bundle`` writes a bundle from the template and its own ids; ``stale_files`` re-renders in
memory and names every file that differs from what is on disk. After editing the template::

    python -m medptq_monai.bundle.template bundles/*_int8          # re-render (own ids kept)
    python -m medptq_monai.bundle.template --check bundles/*_int8  # exit 1 if a file is stale
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..errors import BundleConfigError
from ..fileio import write_text_atomic
from .overlay import OVERLAY_NAME, overlay_text, render_overlay

TEMPLATE = files("medptq_monai.bundle") / "template_files"
#: copied unchanged into every bundle
SHARED_FILES = ("LICENSE", "configs/evaluate.json", "configs/inference_fp32.json", "configs/train.json",
                "configs/logging.conf")
INFERENCE = "configs/inference.json"
#: the INT8 overlay, rendered as ``medptq quantize`` renders it for a bundle with ``device`` and ``models_dir``
OVERLAY = f"configs/{OVERLAY_NAME}"
#: template ids a bundle may give its own value (everything else in inference.json is the template's)
OWN_IDS = ("roi_size", "pixdim", "hu_window", "label_map", "network_def", "preprocessing", "sw_batch_size",
           "inferer", "max_epochs", "learning_rate", "num_samples", "train_memory_format")
#: ids a bundle adds (absent from the template) are written just before this one
EXTRA_IDS_BEFORE = "network_def"


def template_text(name: str) -> str:
    """A template file's text (``name`` relative to the template folder, e.g. ``configs/train.json``)."""
    return (TEMPLATE / name).read_text(encoding="utf-8")


def template_json(name: str) -> dict[str, Any]:
    """A template JSON file, parsed (key order kept)."""
    return json.loads(template_text(name))


def nnunet_ids() -> dict[str, Any]:
    """The own ids of an nnU-Net bundle (plans-driven network, preprocessing and inferer)."""
    return template_json("nnunet.json")


def own_ids(inference: Mapping[str, Any], where: str = INFERENCE) -> dict[str, Any]:
    """The ids of a bundle's ``inference.json`` that differ from the template's; a changed template id
    outside ``OWN_IDS`` raises ``BundleConfigError`` (edit the template instead)."""
    base = template_json(INFERENCE)
    own = {k: v for k, v in inference.items() if k not in base or v != base[k]}
    shared = [k for k in own if k in base and k not in OWN_IDS]
    if shared:
        raise BundleConfigError(f"{where} changes template ids {shared}: only {list(OWN_IDS)} are a bundle's own; "
                                "change the others in medptq_monai/bundle/template_files/")
    missing = [k for k in base if k not in inference and k not in OWN_IDS]
    if missing:
        raise BundleConfigError(f"{where} lacks template ids {missing}")
    return own


def render_inference(own: Mapping[str, Any]) -> dict[str, Any]:
    """The template's ``inference.json`` with ``own`` values; ids the template lacks go before ``network_def``."""
    base = template_json(INFERENCE)
    bad = [k for k in own if k in base and k not in OWN_IDS]
    if bad:
        raise BundleConfigError(f"ids {bad} are the template's, not a bundle's own (allowed: {list(OWN_IDS)})")
    extra = {k: v for k, v in own.items() if k not in base}
    rendered: dict[str, Any] = {}
    for key, value in base.items():
        if key == EXTRA_IDS_BEFORE:
            rendered.update(extra)
        rendered[key] = own.get(key, value)
    return rendered


def rendered_files(own: Mapping[str, Any]) -> dict[str, str]:
    """Relative path -> text of every template-made file of a bundle with ``own`` ids."""
    texts = {name: template_text(name) for name in SHARED_FILES}
    texts[INFERENCE] = json.dumps(render_inference(own), indent=4) + "\n"
    texts[OVERLAY] = overlay_text(render_overlay(None, has_device=True, has_models_dir=True))
    return texts


def render_bundle(bundle_dir: str | os.PathLike, own: Mapping[str, Any] | None = None) -> list[str]:
    """Write the template's files into ``bundle_dir`` with ``own`` ids (default: the ids its current
    ``configs/inference.json`` owns); returns the files that changed. Each file is written atomically."""
    root = Path(bundle_dir)
    if own is None:
        own = own_ids(_read_inference(root), str(root / INFERENCE))
    changed = []
    for name, text in rendered_files(own).items():
        path = root / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
            changed.append(name)
    return changed


def stale_files(bundle_dir: str | os.PathLike) -> list[str]:
    """Template-made files of ``bundle_dir`` that differ from a fresh rendering (missing ones included)."""
    root = Path(bundle_dir)
    own = own_ids(_read_inference(root), str(root / INFERENCE))
    return [name for name, text in rendered_files(own).items()
            if not (root / name).is_file() or (root / name).read_text(encoding="utf-8") != text]


def is_template_bundle(bundle_dir: str | os.PathLike) -> bool:
    """Whether ``bundle_dir`` was made from this template (it carries every file the template shares)."""
    return all((Path(bundle_dir) / name).is_file() for name in SHARED_FILES)


def _read_inference(root: Path) -> dict[str, Any]:
    path = root / INFERENCE
    if not path.is_file():
        raise BundleConfigError(f"no {INFERENCE} in bundle {root}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BundleConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise BundleConfigError(f"{path} must hold a JSON object")
    return data


def main(argv: list[str] | None = None) -> int:
    """Re-render (or ``--check``) bundles from the template."""
    ap = argparse.ArgumentParser(prog="python -m medptq_monai.bundle.template", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", help="bundle folders")
    ap.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    args = ap.parse_args(argv)
    stale = False
    for bundle in args.bundles:
        names = stale_files(bundle) if args.check else render_bundle(bundle)
        stale |= bool(names)
        print(f"{bundle}: {'stale' if args.check else 'rendered'} {', '.join(names)}" if names
              else f"{bundle}: up to date")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
