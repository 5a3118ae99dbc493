"""`medptq pack`: a zip + hash-pinned model files served over HTTP, installed and run by MONAI's own CLI."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medptq_monai.bundle.pack import REQUIRED_MODELS, pack_bundle
from medptq_monai.cli import main
from medptq_monai.errors import MedPTQError, ModelFileError

from conftest import DATA

SMALL_CT = DATA / "images_small" / "abdomen_ct_small.nii.gz"
NAME, VERSION = "unet_int8", "0.1.0"
ZIP = f"{NAME}_v{VERSION}.zip"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def serve(tmp_path_factory) -> Iterator:
    """Start HTTP servers on 127.0.0.1 (free port) serving folders; all shut down at teardown."""
    servers: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []

    def start(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=str(folder))
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        servers.append((httpd, thread))
        return f"http://127.0.0.1:{httpd.server_address[1]}/dist"

    try:
        yield start
    finally:
        for httpd, thread in servers:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=10)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _monai(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _source_bundle(calibrated_bundle: Path, dest: Path, extra_url: str) -> Path:
    """A copy of the calibrated bundle with junk that must not be packed and a third-party large file."""
    bundle = dest / NAME
    shutil.copytree(calibrated_bundle, bundle)
    for junk in (".cache/x.plan", "eval/int8/metrics.csv", "configs/__pycache__/x.pyc", "docs/.notes.swp",
                 "models/model.plan", "configs/inference.json.tmp"):
        (bundle / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle / junk).write_text("junk")
    (bundle / "docs" / "README.md").write_text("# unet_int8\n")
    (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": [
        {"path": "models/model.pt", "url": "https://example.invalid/stale.pt"},  # replaced by pack
        {"path": "models/third_party.txt", "url": extra_url},  # kept unchanged (no hash published)
    ]}))
    return bundle


@pytest.fixture(scope="module")
def packed(calibrated_bundle, serve, tmp_path_factory) -> dict:
    """The bundle packed into a served folder (`<root>/dist`), base_url pointing at the server."""
    root = tmp_path_factory.mktemp("served")
    base_url = serve(root)
    (root / "extra").mkdir()
    (root / "extra" / "third_party.txt").write_text("third-party file\n")
    extra_url = base_url.rsplit("/", 1)[0] + "/extra/third_party.txt"
    bundle = _source_bundle(calibrated_bundle, tmp_path_factory.mktemp("src"), extra_url)
    out = root / "dist"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"other": {"2.0.0": {"url": "x", "sha256": "y", "size": 1}}}))
    info = pack_bundle(bundle, out, base_url + "/")
    return {"info": info, "bundle": bundle, "out": out, "base_url": base_url, "extra_url": extra_url}


def test_zip_holds_only_configs_docs_license_and_pinned_large_files(packed):
    bundle, out, base_url = packed["bundle"], packed["out"], packed["base_url"]
    with zipfile.ZipFile(out / ZIP) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        large = yaml.safe_load(zf.read(f"{NAME}/large_files.yml"))["large_files"]
        for i in infos:
            if not i.filename.endswith("large_files.yml"):
                assert zf.read(i) == (bundle / i.filename.split("/", 1)[1]).read_bytes()
    configs = sorted(f"{NAME}/configs/{p.name}" for p in (bundle / "configs").iterdir()
                     if p.suffix in (".json", ".conf"))
    assert names == sorted(configs + [f"{NAME}/LICENSE", f"{NAME}/docs/README.md", f"{NAME}/large_files.yml"])
    assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
    assert large[:3] == [
        {"path": f"models/{f}", "url": f"{base_url}/files/{NAME}/{VERSION}/{f}",
         "hash_val": _sha(bundle / "models" / f), "hash_type": "sha256"} for f in REQUIRED_MODELS
    ]
    assert large[3:] == [{"path": "models/third_party.txt", "url": packed["extra_url"]}]
    for f in REQUIRED_MODELS:  # served copies are byte-identical
        assert _sha(out / "files" / NAME / VERSION / f) == _sha(bundle / "models" / f)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary files left in out_dir"


def test_index_entry_and_merge(packed):
    out, info = packed["out"], packed["info"]
    index = json.loads((out / "index.json").read_text())
    entry = {"url": f"{packed['base_url']}/{ZIP}", "sha256": _sha(out / ZIP), "size": (out / ZIP).stat().st_size}
    assert index == {"other": {"2.0.0": {"url": "x", "sha256": "y", "size": 1}}, NAME: {VERSION: entry}}
    assert {k: info[k] for k in entry} == entry and info["name"] == NAME and info["version"] == VERSION


def test_pack_is_deterministic_and_cli_matches(packed, tmp_path, capsys):
    first = packed["info"]["sha256"]
    again = pack_bundle(packed["bundle"], packed["out"], packed["base_url"])
    assert again["sha256"] == first
    assert main(["pack", str(packed["bundle"]), "--out_dir", str(tmp_path / "d"),
                 "--base_url", packed["base_url"]]) == 0
    assert _sha(tmp_path / "d" / ZIP) == first
    assert json.loads((tmp_path / "d" / "index.json").read_text())[NAME][VERSION]["sha256"] == first


def test_missing_int8_model_is_a_clear_error(calibrated_bundle, tmp_path, capsys):
    bundle = tmp_path / NAME
    shutil.copytree(calibrated_bundle, bundle, ignore=shutil.ignore_patterns("model_int8.onnx", ".cache", "eval"))
    with pytest.raises(ModelFileError, match=r"lacks models/model_int8\.onnx; quantize first"):
        pack_bundle(bundle, tmp_path / "out", "http://h/p")
    assert not (tmp_path / "out").exists(), "a failed pack must write nothing"
    assert main(["pack", str(bundle), "--base_url", "http://h/p", "--out_dir", str(tmp_path / "out")]) == 2
    assert "quantize first: medptq quantize" in capsys.readouterr().err


def test_template_bundle_with_a_stale_shared_file_is_refused(calibrated_bundle, tmp_path):
    bundle = Path(shutil.copytree(calibrated_bundle, tmp_path / NAME, ignore=shutil.ignore_patterns(".cache", "eval")))
    conf = bundle / "configs" / "logging.conf"
    conf.write_text(conf.read_text().replace("level=INFO", "level=DEBUG"))
    with pytest.raises(MedPTQError, match=r"configs/logging\.conf differ from the bundle template"):
        pack_bundle(bundle, tmp_path / "out", "http://h/p")
    assert not (tmp_path / "out").exists(), "a refused pack must write nothing"


def test_quantized_zoo_bundle_packs_with_its_overlay_and_scripts(tmp_path):
    """Any quantized bundle packs, not only ours: a zoo-layout bundle whose network lives in its scripts/,
    after `medptq quantize`, goes into the zip with its overlay and scripts (and no bytecode)."""
    import torch

    from medptq_monai.bundle.bundle_config import importable_scripts, read_bundle
    from medptq_monai.bundle.quantize_bundle import quantize_bundle

    name = "ct_scripts_net_105"
    bundle = Path(shutil.copytree(Path(__file__).parent / "zoo_bundles" / name, tmp_path / name,
                                  ignore=shutil.ignore_patterns("__pycache__")))
    config = read_bundle(bundle)
    with importable_scripts(config.root):
        torch.manual_seed(0)
        network = config.parsed("network_def", "test")
    (bundle / "models").mkdir()
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    quantize_bundle(bundle, dataset_dir=str(SMALL_CT.parent), num_patches=2, heldout_patches=1, progress=False)
    (bundle / "scripts" / "__pycache__").mkdir(exist_ok=True)
    (bundle / "scripts" / "__pycache__" / "x.pyc").write_bytes(b"bytecode")
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    info = pack_bundle(bundle, tmp_path / "out", "http://h/p")
    with zipfile.ZipFile(info["zip"]) as zf:
        names = {n.split("/", 1)[1] for n in zf.namelist()}
    scripts = {p.relative_to(bundle).as_posix() for p in (bundle / "scripts").rglob("*.py")}
    assert scripts and scripts <= names and not [n for n in names if n.endswith(".pyc")]
    assert {"configs/inference.json", "configs/inference_int8.json", "configs/metadata.json"} <= names
    assert info["name"] == name and info["version"] == version  # the folder name: the zoo's metadata name is prose
    assert [e["path"] for e in info["large_files"]] == [f"models/{f}" for f in REQUIRED_MODELS]


def test_monai_cli_downloads_installs_and_runs_packed_bundle(packed, tmp_path):
    url = packed["info"]["url"]
    # `--name` is needed: with `--url` alone MONAI 1.6.1 extracts, then crashes on Path / None.
    proc = _monai("download", "--name", NAME, "--url", url, "--bundle_dir", str(tmp_path / "D"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = tmp_path / "D" / NAME
    assert not (installed / "models").exists()
    proc = _monai("download_large_files", "--bundle_path", str(installed), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in REQUIRED_MODELS:
        assert _sha(installed / "models" / f) == _sha(packed["bundle"] / "models" / f)
    assert (installed / "models" / "third_party.txt").read_text() == "third-party file\n"

    data, out = tmp_path / "in", tmp_path / "out"
    data.mkdir()
    shutil.copy(SMALL_CT, data)
    proc = _monai("run", "--config_file", str(installed / "configs" / "inference.json"),
                  "--bundle_root", str(installed), "--dataset_dir", str(data), "--output_dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    src, seg = nib.load(str(SMALL_CT)), nib.load(str(out / "abdomen_ct_small_seg.nii.gz"))
    assert seg.shape == src.shape
    assert np.allclose(seg.affine, src.affine)


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tampered_model_fails_hash_check_and_leaves_nothing_half_installed(calibrated_bundle, serve, tmp_path):
    """Here "nothing half-installed" means, after the failed `download_large_files`:
    (a) no file exists at the tampered path models/model_int8.onnx;
    (b) every file in the bundle folder is a zip member with its zipped bytes or a large file whose
        sha256 equals its large_files.yml hash_val (no unverified or mismatched bytes anywhere);
    (c) no temporary or partial file exists anywhere under the install folder;
    (d) once the server is fixed, rerunning `download_large_files` completes the bundle.
    """
    root = tmp_path / "served"
    base_url = serve(root)
    (root / "extra").mkdir(parents=True)
    (root / "extra" / "third_party.txt").write_text("x\n")
    bundle = _source_bundle(calibrated_bundle, tmp_path / "src", base_url.rsplit("/", 1)[0] + "/extra/third_party.txt")
    info = pack_bundle(bundle, root / "dist", base_url)
    served = root / "dist" / "files" / NAME / VERSION / "model_int8.onnx"
    good = served.read_bytes()
    served.write_bytes(good[:-64] + bytes(b ^ 0xFF for b in good[-64:]))  # same size, other bytes

    dest = tmp_path / "D"
    assert _monai("download", "--name", NAME, "--url", info["url"], "--bundle_dir", str(dest),
                  cwd=tmp_path).returncode == 0
    installed = dest / NAME
    proc = _monai("download_large_files", "--bundle_path", str(installed), cwd=tmp_path)
    assert proc.returncode != 0
    assert "HashCheckError" in proc.stderr and "sha256 hash check of downloaded file failed" in proc.stderr
    assert "model_int8.onnx" in proc.stderr

    assert not (installed / "models" / "model_int8.onnx").exists()  # (a)
    with zipfile.ZipFile(dest / f"{NAME}.zip") as zf:
        zipped = {i.filename.split("/", 1)[1]: hashlib.sha256(zf.read(i)).hexdigest() for i in zf.infolist()}
    pinned = {e["path"]: e["hash_val"] for e in info["large_files"]}
    tree = _tree(installed)
    assert tree, "the extracted bundle must be there"
    for rel, digest in tree.items():  # (b)
        assert zipped.get(rel, pinned.get(rel)) == digest, f"unverified or mismatched file {rel}"
    stray = [p for p in dest.rglob("*") if p.name.startswith((".", "tmp")) or p.suffix in (".tmp", ".part")]
    assert not stray, f"partial files left: {stray}"  # (c)

    served.write_bytes(good)  # (d)
    proc = _monai("download_large_files", "--bundle_path", str(installed), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(_sha(installed / p) == h for p, h in pinned.items())
