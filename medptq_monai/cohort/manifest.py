"""``O/manifest.jsonl``: one JSON row per case, the source of truth of a cohort run.

Rows are appended (and fsync'ed) by the driver as cases finish, so a killed run keeps every finished
case; a torn last line of a killed run is dropped when the manifest is read. At the start and end of a
run the manifest is rewritten atomically with one row per case (the latest). A case is done when its
latest row is ``ok`` or ``skipped`` for the same input and model sha256 and its output file still has
the recorded sha256 (the input's sha256 is recomputed only when its size or modification time changed).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..fileio import sha256_file, write_text_atomic

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
FIELDS = ("case", "input", "input_sha256", "input_stat", "output", "output_sha256", "status", "error", "seconds", "engine",
          "precision", "isa", "model_sha256", "voxels", "attempts", "worker", "finished")
DONE = ("ok", "skipped")


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a manifest file, in order; unparsable lines (a torn last line of a killed run) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: unreadable row dropped (a run killed while writing it)", path, number)
            continue
        if isinstance(row, dict) and "case" in row:
            rows.append(row)
    return rows


def latest_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``case`` → its last row (later rows replace earlier ones; first-seen order kept)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        latest.pop(str(row["case"]), None)
        latest[str(row["case"])] = dict(row)
    return latest


def output_intact(row: Mapping[str, Any]) -> bool:
    """Whether the row's output file exists with the recorded sha256."""
    output, digest = row.get("output"), row.get("output_sha256")
    if not output or not digest or not os.path.isfile(output):
        return False
    try:
        return sha256_file(output) == digest
    except OSError:
        return False


def is_done(row: Mapping[str, Any] | None, model_sha: str, stat: str | None,
            input_sha: Callable[[], str | None]) -> bool:
    """Whether ``row`` proves the case done for this model and input (and its output is intact). The input counts
    as unchanged when its ``input_stat`` fingerprint is the row's, else when ``input_sha()`` is the row's sha256."""
    if row is None or row.get("status") not in DONE or row.get("model_sha256") != model_sha or not output_intact(row):
        return False
    if stat is not None and row.get("input_stat") == stat and row.get("input_sha256"):
        return True
    digest = input_sha()
    return digest is not None and row.get("input_sha256") == digest


class Manifest:
    """The manifest of one output folder: read once, appended to per case, compacted atomically."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / MANIFEST_NAME
        self.rows = latest_rows(read_rows(self.path))

    def get(self, case_id: str) -> dict[str, Any] | None:
        return self.rows.get(case_id)

    def compact(self) -> None:
        """Rewrite the file atomically with one row per case (drops torn lines and superseded rows)."""
        text = "".join(json.dumps(row, sort_keys=False) + "\n" for row in self.rows.values())
        write_text_atomic(self.path, text)

    def append(self, row: Mapping[str, Any]) -> None:
        """Record ``row`` (its ``case`` replaces any earlier row) and append it durably to the file."""
        clean = {key: row.get(key) for key in FIELDS}
        self.rows.pop(str(clean["case"]), None)
        self.rows[str(clean["case"])] = clean
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
