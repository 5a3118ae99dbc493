"""Cohort inference (``medptq infer``): a 12-case cohort made from the real small CT (crops of it, one DICOM
series, one truncated file) through a bundle quantized by ``medptq quantize``, embedded and on a real local Ray
cluster; faults, kills and reruns; bad input that stops before any case runs and writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import torch

from medptq_monai.bundle.bundle_config import read_bundle
from medptq_monai.bundle.quantize_bundle import quantize_bundle
from medptq_monai.cohort import run_cohort
from medptq_monai.cohort.errors import ClusterError, OptionError, OutputDirError
from medptq_monai.cohort.manifest import Manifest, read_rows
from medptq_monai.cohort.report import latency_percentiles
from medptq_monai.cohort.writer import temporary_leftovers
from medptq_monai.errors import BundleConfigError, InputImageError, MedPTQError, ModelFileError
from medptq_monai.fileio import sha256_file

from conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "tests" / "zoo_bundles"
CT_SMALL = DATA / "images_small" / "abdomen_ct_small.nii.gz"
NIFTI_CASES = 10  # + 1 DICOM series + 1 truncated file = 12 cases
GOOD = NIFTI_CASES + 1


# ---------------------------------------------------------------- cohort and bundle


def _write_dicom_series(volume: nib.Nifti1Image, folder: Path) -> None:
    """The NIfTI as a DICOM CT series (one slice per file, LPS patient coordinates, int16 HU)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    data = np.asarray(volume.dataobj).astype(np.int16)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    col_step, row_step = lps[:3, 0], lps[:3, 1]  # array axis 0 runs along a row (columns), axis 1 down (rows)
    spacing_c, spacing_r = np.linalg.norm(col_step), np.linalg.norm(row_step)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName, ds.SeriesNumber = "CT", "cohort-test", "Cohort^Test", 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*(col_step / spacing_c), *(row_step / spacing_r))]
        ds.PixelSpacing = [float(spacing_r), float(spacing_c)]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
        if int(pydicom.__version__.split(".")[0]) >= 3:
            ds.save_as(str(folder / f"slice_{k:03d}.dcm"), enforce_file_format=True)
        else:
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(str(folder / f"slice_{k:03d}.dcm"), write_like_original=False)


def make_cohort(dest: Path) -> Path:
    """12 cases from the real small CT: 10 NIfTI crops (each its own grid), a DICOM series, a truncated file."""
    ct = nib.load(str(CT_SMALL))
    dest.mkdir(parents=True)
    for i in range(NIFTI_CASES):
        crop = ct.slicer[i * 3: ct.shape[0] - (i % 3) * 4, :, i % 4:]
        nib.save(nib.Nifti1Image(np.asarray(crop.dataobj), crop.affine, crop.header), str(dest / f"ct_{i:02d}.nii.gz"))
    _write_dicom_series(ct.slicer[:, :, 2:28], dest / "dicom_series")
    raw = CT_SMALL.read_bytes()
    (dest / "truncated.nii.gz").write_bytes(raw[: len(raw) // 3])
    return dest


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The zoo-style 2-class U-Net (seeded weights), quantized once by ``medptq quantize`` on the small CT."""
    root = Path(shutil.copytree(ZOO / "ct_unet_prelu", tmp_path_factory.mktemp("zoo") / "ct_unet_prelu"))
    torch.manual_seed(0)
    network = read_bundle(root).parsed("network_def", "test")
    (root / "models").mkdir()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    quantize_bundle(root, dataset_dir=str(CT_SMALL.parent), calibrator="max", num_patches=4, heldout_patches=1,
                    progress=False)
    return root


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort") / "cases")


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, -1)
            for p in root.rglob("*")}


def _check_outputs(out: Path, cohort: Path, summary: dict) -> dict[str, dict]:
    """11 ok rows with intact outputs on their source grid, one failed row for the truncated file."""
    rows = {r["case"]: r for r in read_rows(out / "manifest.jsonl")}
    assert len(rows) == NIFTI_CASES + 2 and len(read_rows(out / "manifest.jsonl")) == len(rows), "one row per case"
    ok = {c: r for c, r in rows.items() if r["status"] in ("ok", "skipped")}
    assert sorted(ok) == sorted([f"ct_{i:02d}" for i in range(NIFTI_CASES)] + ["dicom_series"])
    failed = rows["truncated"]
    assert failed["status"] == "failed" and failed["output"] is None
    assert "EOFError" in failed["error"] or "cannot read" in failed["error"], failed["error"]
    assert not (out / "truncated_seg.nii.gz").exists()
    for case, row in ok.items():
        output = Path(row["output"])
        assert output == out / f"{case}_seg.nii.gz" and sha256_file(output) == row["output_sha256"]
        assert row["engine"] == "openvino" and row["precision"] == "int8" and row["isa"] not in (None, "n/a")
        assert row["model_sha256"] == sha256_file(Path(summary["model_file"]))
        assert row["seconds"] > 0 and row["voxels"] > 0 and len(row["input_sha256"]) == 64 and row["input_stat"]
        label = nib.load(str(output))
        if case == "dicom_series":
            from monai.transforms import LoadImage

            series = LoadImage(reader="ITKReader", image_only=True)(str(cohort / "dicom_series"))
            assert label.shape == tuple(series.shape)
            np.testing.assert_allclose(label.affine, np.asarray(series.affine), atol=1e-3)
            source = nib.load(str(CT_SMALL)).slicer[:, :, 2:28]  # the series was written from this grid
            np.testing.assert_allclose(label.affine, source.affine, atol=1e-3)
        else:
            source = nib.load(str(cohort / f"{case}.nii.gz"))
            assert label.shape == source.shape
            np.testing.assert_allclose(label.affine, source.affine, atol=1e-5)
        values = np.unique(np.asarray(label.dataobj))
        assert set(values.tolist()) <= {0, 1}
    assert not temporary_leftovers(out), "no partial output left"
    return rows


# ---------------------------------------------------------------- embedded


def test_embedded_cohort_one_failure_rerun_skips_done_cases(bundle, cohort, tmp_path, capsys):
    from medptq_monai.cli import main

    out = tmp_path / "out"
    argv = ["infer", str(bundle), "--input", str(cohort), "--output_dir", str(out), "--workers", "2", "--threads",
            "1", "--progress", "False"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1, "a failed case makes the command exit non-zero"
    printed = capsys.readouterr().out
    assert "11 ok, 1 failed" in printed and "FAILED truncated" in printed and "cases/hour" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == GOOD and summary["failed"] == 1 and summary["mode"] == "embedded"
    assert summary["workers"] == 2 and summary["threads"] == 1 and summary["latency_seconds"]["p50"] > 0
    rows = _check_outputs(out, cohort, summary)
    assert len({r["worker"] for r in rows.values() if r["status"] == "ok"}) == 2, "both workers ran cases"
    before = _files(out)

    # rerun: every good case is skipped (outputs untouched), only the failed one runs again
    with pytest.raises(SystemExit):
        main(argv)
    rows2 = _check_outputs(out, cohort, json.loads((out / "summary.json").read_text()))
    assert {c for c, r in rows2.items() if r["status"] == "skipped"} == {c for c, r in rows.items()
                                                                          if r["status"] == "ok"}
    assert all(_files(out)[f"{c}_seg.nii.gz"] == before[f"{c}_seg.nii.gz"] for c in rows2 if c != "truncated")

    # a changed input and a deleted output are redone; --force redoes everything
    ct = nib.load(str(cohort / "ct_03.nii.gz"))
    changed = tmp_path / "changed"
    shutil.copytree(cohort, changed)
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj) + 1, ct.affine, ct.header), str(changed / "ct_03.nii.gz"))
    (changed / "truncated.nii.gz").unlink()
    os.utime(changed / "ct_07.nii.gz", ns=(time.time_ns(), time.time_ns()))  # touched, same bytes: hashed, skipped
    (out / "ct_05_seg.nii.gz").unlink()
    summary3 = run_cohort(bundle, changed, out, workers=1, progress=False, echo=False)
    rows3 = {r["case"]: r for r in read_rows(out / "manifest.jsonl")}
    redone = {c for c, r in rows3.items() if r["status"] == "ok"}
    assert redone == {"ct_03", "ct_05"} and summary3["skipped"] == GOOD - 2 and summary3["failed"] == 0
    assert rows3["truncated"]["status"] == "failed", "rows of cases no longer in the input are kept"
    assert rows3["ct_07"]["status"] == "skipped" and rows3["ct_07"]["input"] == str(changed / "ct_07.nii.gz")
    assert rows3["ct_07"]["input_stat"] != rows2["ct_07"]["input_stat"], "the new fingerprint is recorded"
    assert rows3["ct_07"]["input_sha256"] == rows2["ct_07"]["input_sha256"]


def _small_faults(dest: Path) -> Path:
    """One good case and three broken ones: random bytes, a truncated file, two channels for a 1-channel net."""
    dest.mkdir()
    shutil.copy(CT_SMALL, dest / "good.nii.gz")
    (dest / "garbage.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    raw = CT_SMALL.read_bytes()
    (dest / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    ct = nib.load(str(CT_SMALL))
    two = np.stack([np.asarray(ct.dataobj)] * 2, axis=-1)
    nib.save(nib.Nifti1Image(two, ct.affine), str(dest / "two_channels.nii.gz"))
    return dest


def test_each_broken_case_is_a_failed_row_with_its_own_error(bundle, tmp_path):
    src = _small_faults(tmp_path / "faults")
    datalist = tmp_path / "list.json"
    names = sorted(p.name for p in src.iterdir())
    datalist.write_text(json.dumps({"testing": [{"image": f"faults/{n}"} for n in names]}))
    summary = run_cohort(bundle, datalist, tmp_path / "out", workers=1, progress=False, echo=False)
    assert summary["ok"] == 1 and summary["failed"] == 3
    rows = {r["case"]: r for r in read_rows(tmp_path / "out" / "manifest.jsonl")}
    assert set(rows) == {"faults__good", "faults__garbage", "faults__cut", "faults__two_channels"}
    assert rows["faults__good"]["status"] == "ok"
    assert rows["faults__two_channels"]["error"].startswith("reading/preprocessing: InputImageError: the bundle "
                                                             "takes 1 channel(s), this case has 2")
    assert "EOFError" in rows["faults__cut"]["error"]
    assert rows["faults__garbage"]["error"].startswith("reading/preprocessing:") and \
        rows["faults__garbage"]["error"] != rows["faults__cut"]["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "faults__good_seg.nii.gz", "manifest.jsonl", "summary.json"]


def test_multichannel_cases_from_a_decathlon_datalist(tmp_path):
    """The 4-channel sigmoid SegResNet zoo bundle (seeded weights, quantized by ``medptq quantize`` through its own
    datalist): a 4-channel case is segmented on its first channel's grid; a case listing 3 channels fails."""
    from test_quantize_bundle import _mri_case

    data = tmp_path / "mri"
    _mri_case(data)
    bundle = Path(shutil.copytree(ZOO / "mri_segresnet_sigmoid", tmp_path / "mri_segresnet_sigmoid"))
    torch.manual_seed(0)
    (bundle / "models").mkdir()
    torch.save(read_bundle(bundle).parsed("network_def", "test").state_dict(), bundle / "models" / "model.pt")
    quantize_bundle(bundle, dataset_dir=str(data), calibrator="max", num_patches=2, heldout_patches=1,
                    progress=False)
    channels = [f"case_000/case_000_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]
    datalist = data / "cohort.json"
    datalist.write_text(json.dumps({"testing": [{"image": channels}, {"image": channels[1:]}]}))
    summary = run_cohort(bundle, datalist, tmp_path / "out", workers=1, progress=False, echo=False)
    assert summary["ok"] == 1 and summary["failed"] == 1
    ok, bad = read_rows(tmp_path / "out" / "manifest.jsonl")
    assert ok["case"] == "case_000__case_000_t1" and ok["input"] == [str(data / c) for c in channels]
    assert bad["case"] == "case_000__case_000_t1ce" and "takes 4 channel(s), this case has 3" in bad["error"]
    label, source = nib.load(ok["output"]), nib.load(str(data / channels[0]))
    assert label.shape == source.shape and np.allclose(label.affine, source.affine)
    assert set(np.unique(np.asarray(label.dataobj)).tolist()) <= {0, 1, 2, 4}


def _manifest_rows(out: Path) -> int:
    return len(read_rows(out / "manifest.jsonl")) if (out / "manifest.jsonl").is_file() else 0


def test_killing_the_command_then_rerunning_completes_exactly_the_missing_cases(bundle, cohort, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medptq_monai.cli", "infer", str(bundle), "--input", str(cohort), "--output_dir",
           str(out), "--workers", "1", "--threads", "2", "--progress", "False"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while _manifest_rows(out) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    time.sleep(0.5)  # the worker dies with its driver (PR_SET_PDEATHSIG)
    done_before = {r["case"]: r for r in read_rows(out / "manifest.jsonl")}
    assert 3 <= len(done_before) < NIFTI_CASES + 2, "killed in the middle of the cohort"
    for path in out.glob("*_seg.nii.gz"):  # whatever is there under a final name is complete
        assert np.asarray(nib.load(str(path)).dataobj).shape == nib.load(str(path)).shape
    mtimes = {c: (out / f"{c}_seg.nii.gz").stat().st_mtime_ns for c, r in done_before.items() if r["status"] == "ok"}

    summary = run_cohort(bundle, cohort, out, workers=1, progress=False, echo=False)
    rows = _check_outputs(out, cohort, summary)
    assert summary["skipped"] == len(mtimes) and summary["ok"] + summary["skipped"] == GOOD
    assert all((out / f"{c}_seg.nii.gz").stat().st_mtime_ns == m for c, m in mtimes.items()), "done once"
    assert {c for c, r in rows.items() if r["status"] == "ok"} == set(rows) - set(mtimes) - {"truncated"}
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz")) == \
        sorted(f"{c}_seg.nii.gz" for c in rows if c != "truncated")


def test_embedded_worker_killed_mid_case_is_replaced_and_its_case_retried(bundle, cohort, tmp_path):
    out = tmp_path / "out"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_cohort(
        bundle, cohort, out, workers=2, threads=1, progress=False, echo=False)))
    runner.start()
    me = psutil.Process()
    killed = _kill_one_busy(out, runner, lambda: [p for p in me.children(recursive=True) if _name(p) == "medptq-case"])
    runner.join(300)
    assert killed is not None, "no worker was seen running a case"
    assert result["ok"] == GOOD and result["failed"] == 1 and result["retries"] == 1
    rows = _check_outputs(out, cohort, result)
    retried = [r for r in rows.values() if r["attempts"] == 2]
    assert len(retried) == 1 and retried[0]["status"] == "ok" and not retried[0]["worker"].endswith(f":{killed}")


def _kill_one_busy(out: Path, runner: threading.Thread, busy) -> int | None:
    """Once 2 manifest rows exist, SIGKILL the first process ``busy()`` lists (a worker inside a case); its pid."""
    deadline = time.time() + 240
    while time.time() < deadline and runner.is_alive():
        if _manifest_rows(out) >= 2:
            found = busy()
            if found:
                found[0].send_signal(signal.SIGKILL)
                return found[0].pid
        time.sleep(0.02)
    return None


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


# ---------------------------------------------------------------- Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the Ray cluster this test started: those naming its temp dir, and their children."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            pass
    return list(found.values())


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster (2 CPUs, no dashboard, small object store) on 127.0.0.1, stopped after the tests."""
    ray = pytest.importorskip("ray")
    temp_dir = f"/tmp/ray_{uuid.uuid4().hex[:8]}"
    port = _free_port()
    # loopback only: no token auth (Ray 2.60 turns it on when ~/.ray/auth_token exists, e.g. after a local
    # ray.init, and then a driver without the token is refused)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env = dict(os.environ)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                           "--num-cpus", "2", "--include-dashboard=false", "--object-store-memory", "80000000",
                           "--temp-dir", temp_dir, "--disable-usage-stats"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        procs = _cluster_processes(temp_dir)
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=3)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _actor_processes(method: str = "") -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if title.startswith(f"ray::CaseActor{method}"):
            found.append(proc)
    return found


def test_ray_cluster_cohort_with_a_worker_killed_mid_case(bundle, cohort, ray_cluster, tmp_path):
    """The 12-case cohort on 2 Ray actors; one actor process is SIGKILLed while it runs a case: that case is retried
    on a fresh actor, never half-written, and the run still ends with 11 ok rows and the one failed row."""
    out = tmp_path / "ray"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_cohort(
        bundle, cohort, out, workers=2, threads=1, ray_address=ray_cluster, progress=False, echo=False)))
    runner.start()
    killed = _kill_one_busy(out, runner, lambda: _actor_processes(".run"))
    runner.join(300)
    assert killed is not None, "no actor was seen running a case"
    assert result["mode"] == "ray" and result["workers"] == 2 and result["threads"] == 1
    assert result["ok"] == GOOD and result["failed"] == 1 and result["retries"] >= 1
    rows = _check_outputs(out, cohort, result)
    assert len({r["worker"] for r in rows.values() if r["status"] == "ok"}) >= 2, "cases ran on several actors"
    retried = [r for r in rows.values() if r["attempts"] == 2]
    assert retried, "the case of the killed worker ran a second time"
    assert all(r["status"] == "ok" and not r["worker"].endswith(f":{killed}") for r in retried)


def test_ray_address_that_does_not_answer_is_a_quick_clear_error(bundle, cohort, tmp_path):
    pytest.importorskip("ray")
    start = time.time()
    with pytest.raises(ClusterError, match="no Ray cluster answers at 127.0.0.1:"):
        run_cohort(bundle, cohort, tmp_path / "out", ray_address=f"127.0.0.1:{_free_port()}", progress=False)
    assert time.time() - start < 30 and not (tmp_path / "out").exists()


def test_ray_is_optional(bundle, cohort, tmp_path, monkeypatch):
    code = "import sys, medptq_monai.cohort, medptq_monai.cli; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120).stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(ClusterError, match=r"pip install 'medptq-monai\[cluster\]' \(ray==2\.60\.0\)"):
        run_cohort(bundle, cohort, tmp_path / "out", ray_address="127.0.0.1:6379", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad input: specific error, nothing written


def test_bad_input_stops_before_any_case_and_writes_nothing(bundle, cohort, tmp_path, capsys):
    from medptq_monai.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    missing = tmp_path / "list.json"
    missing.write_text(json.dumps({"testing": [{"image": str(CT_SMALL)}, {"image": "nowhere/ct.nii.gz"}]}))
    unquantized = Path(shutil.copytree(ZOO / "ct_unet_prelu", tmp_path / "unquantized"))
    out = tmp_path / "out"
    cases = {
        "missing input": ({"input": tmp_path / "nope"}, InputImageError, "input not found"),
        "empty input": ({"input": tmp_path / "empty"}, InputImageError, "no NIfTI files"),
        "output inside input": ({"output_dir": cohort / "seg"}, OutputDirError, "inside the input folder"),
        "output is the input": ({"output_dir": cohort}, OutputDirError, "inside the input folder"),
        "output under a file": ({"output_dir": tmp_path / "a_file" / "out"}, OutputDirError, "is a file"),
        "datalist with missing files": ({"input": missing}, InputImageError, "names 1 missing file(s)"),
        "unquantized bundle": ({"bundle": unquantized}, BundleConfigError, "run `medptq quantize"),
        "missing bundle": ({"bundle": tmp_path / "nobundle"}, BundleConfigError, "bundle folder not found"),
        "zero workers": ({"workers": 0}, OptionError, "--workers and --threads must be >= 1"),
        "unknown engine": ({"engine": "tpu"}, MedPTQError, "tpu"),
    }
    for name, (change, kind, match) in cases.items():
        args = {"bundle": bundle, "input": cohort, "output_dir": out, "progress": False, **change}
        before = _files(tmp_path)
        with pytest.raises(kind) as info:
            run_cohort(args.pop("bundle"), args.pop("input"), args.pop("output_dir"), **args)
        assert match in str(info.value), f"{name}: {info.value}"
        assert _files(tmp_path) == before, f"{name}: something was written"
    shutil.copy(bundle / "models" / "model_int8.onnx", tmp_path / "keep.onnx")
    (bundle / "models" / "model_int8.onnx").unlink()
    try:
        with pytest.raises(ModelFileError, match="model file not found"):
            run_cohort(bundle, cohort, out, progress=False)
    finally:
        shutil.copy(tmp_path / "keep.onnx", bundle / "models" / "model_int8.onnx")
    assert not out.exists()
    assert main(["infer", str(bundle), "--input", str(tmp_path / "empty"), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "medptq: error: no NIfTI files" in err and "Traceback" not in err


def test_a_second_run_on_the_same_output_folder_is_refused(bundle, cohort, tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".medptq-infer.lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(OutputDirError, match="another `medptq infer` is writing"):
            run_cohort(bundle, cohort, out, ray_address=None, progress=False, workers=1)
    assert sorted(p.name for p in out.iterdir()) == [".medptq-infer.lock"]


# ---------------------------------------------------------------- manifest and figures


def test_manifest_drops_a_torn_line_and_keeps_the_latest_row(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps({"case": "a", "status": "failed"}) + "\n" + json.dumps({"case": "b", "status": "ok"})
                    + "\n" + json.dumps({"case": "a", "status": "ok"}) + "\n" + '{"case": "c", "sta')
    manifest = Manifest(tmp_path)
    assert list(manifest.rows) == ["b", "a"] and manifest.get("a")["status"] == "ok" and manifest.get("c") is None
    manifest.compact()
    manifest.append({"case": "c", "status": "failed", "error": "x"})
    rows = read_rows(path)
    assert [r["case"] for r in rows] == ["b", "a", "c"] and rows[-1]["error"] == "x"


def test_latency_percentiles():
    lat = latency_percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert lat["p50"] == 3.0 and lat["max"] == 100.0 and 4.0 < lat["p90"] < 100.0
    assert latency_percentiles([])["p50"] is None
