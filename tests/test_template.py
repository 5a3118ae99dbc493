"""The bundle template: our seven bundles are its rendering (shared files byte for byte, inference.json
the template's plus each bundle's own ids), it ships in the wheel, and the configs need no call-stack tricks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medptq_monai.bundle.template import (
    INFERENCE, OVERLAY, OWN_IDS, SHARED_FILES, main, nnunet_ids, own_ids, render_bundle, rendered_files, stale_files,
    template_json,
)
from medptq_monai.errors import BundleConfigError

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())


def test_there_are_seven_bundles():
    assert [b.name for b in BUNDLES] == ["nnunet_int8", "segresnet_int8", "swinunetr_int8", "transunet_int8",
                                         "unest_int8", "unet_int8", "vista3d_int8"]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_committed_bundle_is_the_template_rendering(bundle):
    assert stale_files(bundle) == [], "re-render with: python -m medptq_monai.bundle.template bundles/*_int8"
    inference = json.loads((bundle / INFERENCE).read_text())
    assert inference["bundle_root"] == ".", "bundle_root is '.', overridden by the caller as in the zoo"
    assert "bundle_root()" not in (bundle / INFERENCE).read_text()


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_bundle_is_an_ordinary_fp32_bundle_plus_the_quantize_overlay(bundle):
    """inference.json alone is plain MONAI FP32 (network_def on the device, a CheckpointLoader); the INT8 overlay
    is byte for byte what ``medptq quantize`` writes for this bundle."""
    from medptq_monai.bundle.bundle_config import read_bundle
    from medptq_monai.bundle.overlay import overlay_text, render_overlay

    inference = json.loads((bundle / INFERENCE).read_text())
    assert inference["network"] == "$@network_def.to(@device)"
    assert inference["checkpointloader"]["_target_"] == "CheckpointLoader" and "@checkpointloader" in inference["handlers"]
    assert not {"engine", "precision", "model_file"} & set(inference)
    parsed = read_bundle(bundle)
    assert (bundle / OVERLAY).read_text() == overlay_text(
        render_overlay(None, has_device=parsed.has("device"), has_models_dir=parsed.has("models_dir")))
    assert not (bundle / "configs" / "calibrate.json").exists()


def test_bundles_keep_only_what_differs():
    owned = {b.name: sorted(own_ids(json.loads((b / INFERENCE).read_text()))) for b in BUNDLES}
    assert owned["unet_int8"] == [], "the U-Net is the template's own example"
    for name in ("segresnet_int8", "swinunetr_int8", "transunet_int8", "unest_int8"):
        assert owned[name] == ["network_def"], (name, owned[name])
    assert "preprocessing" in owned["nnunet_int8"] and "plans_file" in owned["nnunet_int8"]


def test_an_edited_shared_file_or_id_is_caught(tmp_path):
    bundle = Path(shutil.copytree(ROOT / "bundles" / "unet_int8", tmp_path / "b", ignore=shutil.ignore_patterns(
        "models", "eval", ".cache")))
    (bundle / "configs" / "evaluate.json").write_text((bundle / "configs" / "evaluate.json").read_text() + " ")
    assert stale_files(bundle) == ["configs/evaluate.json"]
    assert main(["--check", str(bundle)]) == 1
    assert render_bundle(bundle) == ["configs/evaluate.json"] and stale_files(bundle) == []

    inference = json.loads((bundle / INFERENCE).read_text())
    inference["overlap"] = 0.25  # a template id that is not a bundle's own
    (bundle / INFERENCE).write_text(json.dumps(inference, indent=4) + "\n")
    with pytest.raises(BundleConfigError, match=r"changes template ids \['overlap'\]"):
        stale_files(bundle)
    del inference["overlap"]
    (bundle / INFERENCE).write_text(json.dumps(inference, indent=4) + "\n")
    with pytest.raises(BundleConfigError, match=r"lacks template ids \['overlap'\]"):
        stale_files(bundle)


def test_own_and_extra_ids_are_rendered_in_place():
    rendered = json.loads(rendered_files({"pixdim": [3.0, 3.0, 3.0], "class_ids": [1, 2]})[INFERENCE])
    keys = list(rendered)
    assert rendered["pixdim"] == [3.0, 3.0, 3.0] and keys.index("class_ids") == keys.index("network_def") - 1
    assert keys[:keys.index("class_ids")] + keys[keys.index("class_ids") + 1:] == list(template_json(INFERENCE))
    with pytest.raises(BundleConfigError, match="template's, not a bundle's own"):
        rendered_files({"evaluator": {}})
    assert set(OWN_IDS) <= set(template_json(INFERENCE))


def test_template_ships_in_the_wheel(tmp_path):
    """Build the wheel from a copy of the sources, install it into a folder of its own, and render from there
    (outside the repository): the template is package data, not a path into the source checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "medptq_monai", src / "medptq_monai", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "whl"), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "SetuptoolsDeprecationWarning" not in build.stderr, build.stderr[-3000:]
    wheel = next((tmp_path / "whl").glob("medptq_monai-*.whl"))
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    code = ("import json, medptq_monai.bundle.template as t; "
            "print(json.dumps({'file': t.__file__, 'files': t.rendered_files(t.nnunet_ids())}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(site))
    assert sorted(out["files"]) == sorted([*SHARED_FILES, INFERENCE, OVERLAY])
    assert out["files"] == rendered_files(nnunet_ids())
