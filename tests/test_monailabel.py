"""MONAI Label: a real ``monailabel start_server`` serving the calibrated unet bundle through its INT8 engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip(
    "monailabel",
    reason="monailabel is not installed: pip install -c requirements/constraints.txt -r requirements/label.txt "
    "&& pip install --no-deps monailabel==0.8.5 pydicom-seg==0.4.1",
)

from medptq_monai.label import APP_DIR  # noqa: E402

from conftest import TENSORRT_USABLE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "tests" / "data" / "totalseg_ct" / "images_small" / "abdomen_ct_small.nii.gz"
START_TIMEOUT_S = 120.0


class Server:
    """A ``monailabel start_server`` subprocess on 127.0.0.1 (own process group) and its log file."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.base, self.log = proc, f"http://127.0.0.1:{port}", log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, path: str, method: str = "GET", timeout: float = 120.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=b"" if method == "POST" else None, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(calibrated_bundle: Path, tmp_path_factory) -> Server:
    work = tmp_path_factory.mktemp("monailabel")
    studies, app = work / "studies", work / "app"
    studies.mkdir()
    shutil.copy(CT, studies / CT.name)
    app.mkdir()  # a copy of the app folder: start_server creates model/, lib/, logs/, bin/ inside it
    shutil.copy(APP_DIR / "main.py", app / "main.py")
    port, log = _free_port(), work / "server.log"
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port), "--conf", "models", "unet_int8",
           "--conf", "bundles_dir", str(calibrated_bundle.parent), "--conf", "fp32", "true"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(proc, port, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"monailabel exited with {proc.returncode} before answering:\n{srv.log_text()[-4000:]}")
            try:
                if srv.request("/info/", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer from /info/ within {START_TIMEOUT_S:.0f}s:\n{srv.log_text()[-4000:]}")
            time.sleep(1.0)
        yield srv
    finally:
        srv.stop()


def test_hide_keys_lets_spacingd_run_with_image_path():
    """MONAI 1.6's Spacingd calls .update() on ``image_*`` entries: MONAI Label's string ``image_path`` breaks it."""
    import monai
    import torch
    from monai.data import MetaTensor
    from packaging.version import Version
    from monai.transforms import Spacingd

    from medptq_monai.label import HideKeysd, RestoreKeysd

    img = MetaTensor(torch.zeros(1, 8, 8, 8), meta={"filename_or_obj": "x.nii.gz"})
    data = {"image": img, "image_path": "/data/x.nii.gz", "image_meta_dict": {}}
    spacing = Spacingd("image", pixdim=(2.0, 2.0, 2.0))
    if Version(monai.__version__) >= Version("1.6"):  # MONAI 1.5.2 does not touch image_path
        with pytest.raises(AttributeError, match="update"):
            spacing(dict(data))
    out = RestoreKeysd()(spacing(HideKeysd(["image"])(data)))
    assert out["image_path"] == "/data/x.nii.gz" and tuple(out["image"].shape) == (1, 4, 4, 4)
    assert "medptq_hidden_keys" not in out
    if Version(monai.__version__) >= Version("1.6"):  # 1.6 refreshes the meta dicts it could reach
        assert "filename_or_obj" in out["image_meta_dict"]


@pytest.mark.timeout(240)
def test_info_reports_int8_engine(server: Server):
    status, body = server.request("/info/")
    assert status == 200
    models = json.loads(body)["models"]
    assert set(models) == {"unet_int8", "unet_int8_fp32"}
    int8, fp32 = models["unet_int8"], models["unet_int8_fp32"]
    auto_engines = ("tensorrt",) if TENSORRT_USABLE else ("openvino", "onnxruntime")  # the app's engine is auto
    assert int8["engine"]["precision"] == "int8" and int8["engine"]["engine"] in auto_engines
    assert int8["engine"]["model"].endswith("model_int8.onnx") and "INT8 engine" in int8["description"]
    assert fp32["engine"]["precision"] == "fp32" and fp32["engine"]["model"].endswith("model.onnx")
    assert int8["labels"]["spleen"] == 1 and len(int8["labels"]) == 13


@pytest.mark.timeout(240)
def test_bad_requests_then_infer_int8(server: Server, tmp_path: Path):
    status, _ = server.request("/infer/no_such_model?image=abdomen_ct_small&output=image", "POST")
    assert status == 500
    status, _ = server.request("/infer/unet_int8?image=no_such_image&output=image", "POST")
    assert status == 500

    status, body = server.request("/infer/unet_int8?image=abdomen_ct_small&output=image", "POST")
    assert status == 200, server.log_text()[-4000:]
    out = tmp_path / "label.nii.gz"
    out.write_bytes(body)
    src, label = nib.load(str(CT)), nib.load(str(out))
    assert label.shape == src.shape
    np.testing.assert_allclose(label.affine, src.affine, atol=1e-4)
    values = np.asarray(label.dataobj)
    assert values.min() >= 0 and values.max() <= 13 and values.max() > 0
    log = server.log_text()
    assert "medptq engine: {" in log and "'precision': 'int8'" in log and "model_int8.onnx" in log
    assert "Latencies" in log and "There is no model 'no_such_model'" in log and "unknown image id" in log
