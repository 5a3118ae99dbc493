"""Reports name files relative to the repository (or the bundle), never by an absolute path."""

from __future__ import annotations

import json
import os
from pathlib import Path

from medptq_monai.fileio import relative_paths

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PREFIXES = ("/home/", "/root/", "/tmp/", "/work/", "/usr/", "/opt/", "/mnt/", "/Users/")


def test_relative_paths_cuts_the_root_and_keeps_node_names(tmp_path):
    report = {"bundle": str(tmp_path / "bundles" / "unet_int8"), "root": str(tmp_path), "n": 3,
              "float_layers": ["/model/model.0/conv/unit0/conv/Conv", "/head/Conv"],
              "command": ["python", "-m", "monai.bundle", "run", "--config_file",
                          json.dumps([str(tmp_path / "b" / "configs" / "inference.json")])],
              "other": "/elsewhere/x.nii.gz"}
    shown = relative_paths(report, tmp_path)
    assert shown["bundle"] == "bundles/unet_int8" and shown["root"] == "." and shown["n"] == 3
    assert shown["float_layers"] == report["float_layers"]
    assert shown["command"][-1] == json.dumps(["b/configs/inference.json"])
    assert shown["other"] == "/elsewhere/x.nii.gz", "only the root is cut"


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_committed_reports_hold_no_absolute_paths():
    files = sorted((ROOT / "reports").rglob("*.json")) + sorted((ROOT / "reports").rglob("*.md"))
    assert files
    for path in files:
        text = path.read_text()
        assert str(ROOT) + os.sep not in text, path
        strings = list(_strings(json.loads(text))) if path.suffix == ".json" else text.split()
        absolute = [s for s in strings if s.strip("`'\"(),").startswith(MACHINE_PREFIXES)]
        assert not absolute, (path, absolute[:3])
