"""Atomic file output, hashing, checked JSON reading and report paths relative to the working folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any
from pathlib import Path

from .errors import ModelFileError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it onto ``final`` only if the block succeeds.

    On any exception the temporary file is removed and ``final`` is left untouched, so a
    reader never sees a partial file.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, what: str) -> object:
    """Parse the JSON file ``path``; a missing or invalid file raises ``ModelFileError`` naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{what} {path} is not valid JSON: {err}") from err


def relative_paths(value: Any, root: str | os.PathLike | None = None) -> Any:
    """``value`` (JSON-like) with the absolute ``root`` folder (default: the current folder, the repository for
    the report commands) cut from every string, so reports name files relative to it, never by absolute path.
    Other strings, such as ONNX node names (``/head/Conv``), are left as they are."""
    base = str(Path(root if root is not None else Path.cwd()).resolve())
    if isinstance(value, str):
        return "." if value == base else value.replace(base + os.sep, "")
    if isinstance(value, dict):
        return {k: relative_paths(v, base) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(v, base) for v in value]
    return value
