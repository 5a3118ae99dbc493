"""Pack a quantized bundle as a MONAI-downloadable zip plus hash-pinned model files and an index.

Any quantized bundle: ours (calibrated), or any MONAI bundle after ``medptq quantize`` (its overlay
``configs/inference_int8.json`` and the bundle's own ``scripts/`` package travel in the zip). A bundle
made from the package's bundle template must match it (``medptq_monai.bundle.template.stale_files``).

Layout written under ``out_dir`` (serve it as is at ``base_url``)::

    <name>_v<version>.zip                  configs, docs, scripts, LICENSE, large_files.yml (no models)
    files/<name>/<version>/<model file>    fetched by ``python -m monai.bundle download_large_files``
    index.json                             {name: {version: {url, sha256, size}}}

Install with MONAI's own CLI::

    python -m monai.bundle download --name <name> --url <base_url>/<name>_v<version>.zip --bundle_dir D
    python -m monai.bundle download_large_files --bundle_path D/<name>

(``--name`` is needed: with ``--url`` alone MONAI 1.6.1 extracts the zip, then fails its version
check on ``name=None``.) On a hash mismatch MONAI's ``download_url`` raises ``HashCheckError`` and never
moves the bad file into the bundle (it downloads into a temporary folder and checks it first), so no
extra installer is provided here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import yaml

from ..errors import MedPTQError, ModelFileError
from ..fileio import atomic_path, sha256_file, write_text_atomic
from .template import is_template_bundle, stale_files

#: model files a quantized bundle needs to run (INT8, FP32 ONNX, the torch reference)
REQUIRED_MODELS = ("model.pt", "model.onnx", "model_int8.onnx")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml", ".conf")
SKIP_DIRS = {".cache", "eval", "__pycache__", "models"}
SKIP_SUFFIXES = (".pt", ".ts", ".onnx", ".plan", ".engine", ".trt", ".pyc", ".tmp", ".zip")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _norm(path: str) -> str:
    return os.path.normpath(str(path)).replace(os.sep, "/")


def _keep(rel: Path) -> bool:
    """Whether a file (path relative to the bundle) is source, not generated/cached/model data."""
    if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
        return False
    return not rel.name.endswith(SKIP_SUFFIXES)


def _bundle_files(root: Path) -> list[Path]:
    """configs/*.{json,yaml,yml,conf}, docs/**, scripts/**, LICENSE (relative paths, sorted)."""
    files = [p for p in (root / "configs").glob("*") if p.is_file() and p.suffix in CONFIG_SUFFIXES]
    for folder in ("docs", "scripts"):
        if (root / folder).is_dir():
            files += [p for p in (root / folder).rglob("*") if p.is_file()]
    if (root / "LICENSE").is_file():
        files.append(root / "LICENSE")
    return sorted({p.relative_to(root) for p in files if _keep(p.relative_to(root))})


def _own_large_files(root: Path) -> list[dict]:
    """Entries of the bundle's own large_files.{yml,yaml,json} (MONAI reads all of them)."""
    entries: list[dict] = []
    for path in sorted(root.glob("large_files*")):
        if path.suffix not in (".yml", ".yaml", ".json"):
            continue
        try:
            data = yaml.safe_load(path.read_text()) or {}
            items = data.get("large_files", []) or []
        except (yaml.YAMLError, AttributeError) as err:
            raise MedPTQError(f"cannot read {path}: {err}") from err
        for item in items:
            if not isinstance(item, dict) or "path" not in item or "url" not in item:
                raise MedPTQError(f"{path}: every large_files entry needs 'path' and 'url', got {item!r}")
            entries.append(item)
    return entries


def _write_zip(dest: Path, name: str, root: Path, files: list[Path], large_files_yml: str) -> None:
    """Deterministic zip: sorted members under ``<name>/``, fixed timestamps and permissions."""
    members = {f"{name}/{rel.as_posix()}": (root / rel).read_bytes() for rel in files}
    members[f"{name}/large_files.yml"] = large_files_yml.encode()
    with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for arcname in sorted(members):
            info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            zf.writestr(info, members[arcname], compresslevel=9)


def _copy_verified(src: Path, dest: Path, digest: str) -> None:
    """Copy ``src`` to ``dest`` atomically unless ``dest`` already holds the same bytes."""
    if dest.is_file() and sha256_file(dest) == digest:
        return
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        if sha256_file(tmp) != digest:
            raise ModelFileError(f"{src} changed while being copied to {dest}")


def _update_index(index: Path, name: str, version: str, entry: dict) -> None:
    data: dict = {}
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as err:
            raise MedPTQError(f"{index} is not valid JSON ({err}); fix or remove it") from err
        if not isinstance(data, dict):
            raise MedPTQError(f"{index} must hold a JSON object {{name: {{version: ...}}}}")
    data.setdefault(name, {})[version] = entry
    write_text_atomic(index, json.dumps(data, indent=2, sort_keys=True) + "\n")


def pack_bundle(bundle_dir: str | os.PathLike, out_dir: str | os.PathLike, base_url: str,
                version: str | None = None) -> dict:
    """Write ``<out_dir>/<name>_v<version>.zip``, the model files it pins and the ``index.json`` entry.

    The zip's ``large_files.yml`` lists ``models/{model.pt,model.onnx,model_int8.onnx}`` with
    ``url: <base_url>/files/<name>/<version>/<file>`` and their sha256, followed by the bundle's
    other large-file entries unchanged. ``version`` (default: ``configs/metadata.json``) must match
    the metadata. Returns name, version, zip path, url, sha256, size and the pinned files.
    """
    root = Path(bundle_dir).resolve()
    meta_file = root / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise MedPTQError(f"not a bundle folder (no configs/metadata.json): {root}")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise MedPTQError(f"{meta_file} is not valid JSON: {err}") from err
    name = root.name  # the bundle's id, as in the zoo (metadata ``name`` is a display name there)
    meta_version = str(meta.get("version", ""))
    version = meta_version if version is None else str(version)
    if version != meta_version:
        raise MedPTQError(f"version {version!r} differs from {meta_file} ({meta_version!r}); bump it there first")
    for label, value in (("name", name), ("version", version)):
        if not _SAFE.match(value):
            raise MedPTQError(f"bundle {label} {value!r} is not usable in a file name")
    base_url = str(base_url).rstrip("/")
    if not base_url:
        raise MedPTQError("base_url is empty: give the URL at which out_dir will be served")

    missing = [f for f in REQUIRED_MODELS if not (root / "models" / f).is_file()]
    if missing:
        raise ModelFileError(
            f"{root} lacks models/{', models/'.join(missing)}; quantize first: "
            f"medptq quantize {root} --dataset_dir <image folder>"
        )
    if is_template_bundle(root):
        stale = stale_files(root)
        if stale:
            raise MedPTQError(f"{root}: {', '.join(stale)} differ from the bundle template of this medptq-monai; "
                              f"re-render them first: python -m medptq_monai.bundle.template {root}")

    out = Path(out_dir).resolve()
    rel_dir = f"files/{name}/{version}"
    pinned = []
    for fname in REQUIRED_MODELS:
        src = root / "models" / fname
        digest = sha256_file(src)
        _copy_verified(src, out / rel_dir / fname, digest)
        pinned.append({"path": f"models/{fname}", "url": f"{base_url}/{rel_dir}/{fname}",
                       "hash_val": digest, "hash_type": "sha256"})
    ours = {p["path"] for p in pinned}
    others = [e for e in _own_large_files(root) if _norm(e["path"]) not in ours]
    large_yml = ("# Generated by `medptq pack`: fetch with\n"
                 "#   python -m monai.bundle download_large_files --bundle_path <this folder>\n"
                 + yaml.safe_dump({"large_files": pinned + others}, sort_keys=False))

    zip_name = f"{name}_v{version}.zip"
    zip_path = out / zip_name
    _write_zip(zip_path, name, root, _bundle_files(root), large_yml)
    entry = {"url": f"{base_url}/{zip_name}", "sha256": sha256_file(zip_path), "size": zip_path.stat().st_size}
    index = out / "index.json"
    _update_index(index, name, version, entry)
    return {"name": name, "version": version, "zip": str(zip_path), **entry, "index": str(index),
            "large_files": pinned}
