"""The cases of a cohort: NIfTI files or DICOM series folders in a folder, or a MONAI decathlon datalist.

A ``Case`` names its input file(s) by absolute path and gets an id (its path relative to the source,
without extension, ``/`` as ``__``) that names its output. Every structural problem (missing or empty
source, a datalist that names missing files, two cases with one output name) raises
``InputImageError`` before any case runs; unreadable *content* is a per-case failure later.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputImageError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One volume to segment: ``inputs`` are absolute paths (one per channel; a folder is a DICOM series)."""

    case_id: str
    inputs: tuple[str, ...]

    @property
    def kind(self) -> str:
        """``dicom`` when the first input is a folder (a DICOM series), else ``nifti``."""
        return "dicom" if os.path.isdir(self.inputs[0]) else "nifti"

    def input_field(self) -> str | list[str]:
        """The manifest's ``input``: the path, or the list of channel paths."""
        return self.inputs[0] if len(self.inputs) == 1 else list(self.inputs)


def _strip(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _case_id(path: Path, base: Path) -> str:
    try:
        rel = path.resolve().relative_to(base.resolve())
    except ValueError:
        rel = Path(path.name)
    return _strip(rel.as_posix()).replace("/", "__")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _folder_cases(src: Path) -> list[Case]:
    cases = []
    for entry in sorted(filter(_visible, src.iterdir())):
        if entry.is_file() and entry.name.endswith(NIFTI_SUFFIXES):
            cases.append(Case(_case_id(entry, src), (str(entry.resolve()),)))
        elif entry.is_dir() and any(p.is_file() and _visible(p) for p in entry.iterdir()):
            cases.append(Case(_case_id(entry, src), (str(entry.resolve()),)))
    if not cases:
        raise InputImageError(f"no NIfTI files (*.nii, *.nii.gz) or DICOM series folders in {src}")
    return cases


def _datalist_cases(src: Path, key: str, image_key: str) -> list[Case]:
    try:
        content = json.loads(src.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputImageError(f"datalist {src} is not valid JSON: {err}") from err
    if not isinstance(content, dict) or key not in content:
        keys = list(content) if isinstance(content, dict) else type(content).__name__
        raise InputImageError(f"datalist {src} has no {key!r} list (keys: {keys}); pass --data_list_key")
    items = content[key]
    if not isinstance(items, list) or not items:
        raise InputImageError(f"datalist {src}: {key!r} is empty")
    base = src.parent.resolve()
    cases, missing = [], []
    for index, item in enumerate(items):
        value = item.get(image_key) if isinstance(item, dict) else item
        if value is None:
            raise InputImageError(f"datalist {src}: item {index} of {key!r} has no {image_key!r}")
        names = [value] if isinstance(value, str) else list(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise InputImageError(f"datalist {src}: item {index} of {key!r}: {image_key!r} must be a path or a "
                                  f"list of paths, got {value!r}")
        paths = [(base / n).resolve() for n in names]
        missing += [str(p) for p in paths if not p.exists()]
        cases.append(Case(_case_id(paths[0], base), tuple(str(p) for p in paths)))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputImageError(f"datalist {src} names {len(missing)} missing file(s): {shown}")
    return cases


def discover_cases(src: str | os.PathLike, data_list_key: str = "testing", image_key: str = "image") -> list[Case]:
    """The cases of ``src``: a folder (NIfTI files; sub-folders are DICOM series) or a decathlon datalist JSON
    (``data_list_key`` list, relative paths from the JSON's folder; ``image`` may list several channels)."""
    path = Path(src)
    if not path.exists():
        raise InputImageError(f"input not found: {path}")
    if path.is_dir():
        cases = _folder_cases(path)
    elif path.suffix.lower() == ".json":
        cases = _datalist_cases(path, data_list_key, image_key)
    else:
        raise InputImageError(f"--input must be a folder (NIfTI files or DICOM series folders) or a datalist "
                              f"JSON, got {path}")
    seen: dict[str, Case] = {}
    for case in cases:
        if case.case_id in seen:
            raise InputImageError(f"two cases would write the same output {case.case_id!r}: "
                                  f"{seen[case.case_id].input_field()} and {case.input_field()}")
        seen[case.case_id] = case
    return cases


def _hash_files(files: list[Path], names: list[str]) -> str:
    digest = hashlib.sha256()
    for file, name in zip(files, names):
        digest.update(name.encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def input_sha256(case: Case) -> str:
    """sha256 of a case's input: of the file for one NIfTI; for a series folder or several channels, over each
    file's relative name and bytes in order (file names count, so a renamed slice is a different input)."""
    if len(case.inputs) == 1 and os.path.isfile(case.inputs[0]):
        from ..fileio import sha256_file

        return sha256_file(case.inputs[0])
    files: list[Path] = []
    names: list[str] = []
    for index, item in enumerate(case.inputs):
        path = Path(item)
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                files.append(f)
                names.append(f"{index}/{f.relative_to(path).as_posix()}")
        else:
            files.append(path)
            names.append(f"{index}/{path.name}")
    return _hash_files(files, names)


def input_stat(case: Case) -> str | None:
    """A cheap fingerprint of a case's input files (names, sizes, modification times), ``None`` if unreadable.

    A rerun trusts a manifest row's input sha256 while this is unchanged, so the driver of a big cohort only
    stats files; when it changed, the driver hashes the input to decide (a touched but identical file is
    still skipped). New cases are hashed by the workers, which read them anyway."""
    parts = []
    try:
        for index, item in enumerate(case.inputs):
            path = Path(item)
            files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
            for f in files:
                st = f.stat()
                name = f.relative_to(path).as_posix() if path.is_dir() else f.name
                parts.append(f"{index}/{name}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:
        return None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
