"""``CaseRunner``: one loaded engine and the bundle's own pre/post-processing; runs cases one by one.

Built once per worker from ``int8_configs`` (``inference.json`` + the INT8 overlay), with ``engine`` and
``precision`` overridden. Per case: the bundle's ``preprocessing`` → its ``inferer`` with ``network`` (the
engine) → its ``postprocessing`` without ``Save*`` writers → ``writer.write_label`` (source geometry,
atomic). A DICOM series folder is read by MONAI's ``LoadImaged`` with ``ITKReader`` (or ``PydicomReader``)
keeping the bundle loader's options. Every error of a case becomes a ``failed`` row naming the stage.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import InputImageError, MedPTQError
from .bundle_job import BundleJob
from .sources import Case, input_sha256, input_stat

logger = logging.getLogger(__name__)


def limit_threads(threads: int | None) -> None:
    """Cap the math libraries of this process at ``threads`` (environment for OpenMP/BLAS, torch's pools)."""
    if not threads:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(int(threads))
    import torch

    torch.set_num_threads(int(threads))


def error_text(err: BaseException) -> str:
    """The most specific message in ``err``'s chain: a medptq error if there is one, else the innermost cause."""
    chain, seen = [], set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    chosen = next((c for c in chain if isinstance(c, MedPTQError)), chain[-1])
    text = " ".join(str(chosen).split()) or type(chosen).__name__
    return f"{type(chosen).__name__}: {text[:600]}"


class _SeriesAwareLoader:
    """The bundle's ``LoadImaged``, which reads a folder input as a DICOM series with MONAI's ITK/pydicom reader."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._series_reader = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def series_reader(self) -> Any:
        if self._series_reader is None:
            import importlib.util

            from monai.data import ITKReader, PydicomReader

            self._series_reader = ITKReader() if importlib.util.find_spec("itk") else PydicomReader()
        return self._series_reader

    def __call__(self, data: Any) -> Any:
        from monai.transforms import LoadImaged

        values = [data.get(k) for k in self.loader.keys if isinstance(data, dict)]
        paths = [v for value in values for v in (value if isinstance(value, (list, tuple)) else [value])]
        if any(isinstance(p, (str, os.PathLike)) and os.path.isdir(p) for p in paths):
            return LoadImaged.__call__(self.loader, data, self.series_reader())
        return self.loader(data)


class CaseRunner:
    """Holds one engine; ``run(case, output_dir)`` segments a case and returns its manifest row."""

    def __init__(self, job: BundleJob, threads: int | None = None) -> None:
        import torch
        from monai.transforms import LoadImaged

        from ..bundle.bundle_config import importable_scripts
        from ..bundle.runner import bundle_parser

        limit_threads(threads)
        self.job = job
        root = Path(job.bundle)
        with importable_scripts(root):
            parser = bundle_parser(root, job.configs, engine=job.engine, precision=job.precision)
            self.network = parser.get_parsed_content("network")
            if isinstance(self.network, torch.nn.Module):
                self.network.eval()
            preprocessing = parser.get_parsed_content("preprocessing")
            self.inferer = parser.get_parsed_content("inferer")
            postprocessing = parser.get_parsed_content("postprocessing")
        self.device = torch.device(parser.get_parsed_content("device")) if "device" in parser else torch.device("cpu")
        engine = getattr(self.network, "engine", None)
        config = getattr(engine, "config", None)
        if threads and isinstance(config, dict) and type(engine).__name__ == "OpenVinoEngine":
            config["INFERENCE_NUM_THREADS"] = int(threads)  # read when the model is compiled, at the first batch
        self.engine_info = dict(engine.describe()) if engine is not None else {"engine": type(self.network).__name__}
        if engine is not None and getattr(engine, "device", None) is not None:
            self.device = torch.device(engine.device)
        # a folder input is a DICOM series; the same Compose object serves Invertd, so replace in place
        preprocessing.transforms = tuple(
            _SeriesAwareLoader(t) if isinstance(t, LoadImaged) else t for t in preprocessing.transforms)
        self.preprocessing = preprocessing
        self.post = [t for t in postprocessing.transforms if not type(t).__name__.startswith("Save")]
        savers = [t for t in postprocessing.transforms if type(t).__name__.startswith("Save")]
        keys = list(getattr(savers[0], "keys", ("pred",))) if savers else ["pred"]
        self.pred_key = str(keys[0]) if keys else "pred"
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def describe(self) -> dict[str, str]:
        """The engine description (engine, precision, device, model, ISA) and this worker's host:pid."""
        return {**{k: str(v) for k, v in self.engine_info.items()}, "worker": self.worker}

    def _row(self, case: Case, output_dir: str) -> dict[str, Any]:
        return {
            "case": case.case_id, "input": case.input_field(), "input_sha256": None, "output": None,
            "output_sha256": None, "status": "failed", "error": None, "seconds": None,
            "engine": self.engine_info.get("engine"), "precision": self.engine_info.get("precision"),
            "isa": self.engine_info.get("isa", "n/a"), "model_sha256": self.job.model_sha256, "voxels": None,
            "attempts": 1, "worker": self.worker, "finished": None,
        }

    def run(self, case: Case, output_dir: str) -> dict[str, Any]:
        """Segment ``case`` into ``output_dir``; never raises for a bad case (the row says ``failed``)."""
        import torch
        from monai.data import decollate_batch, list_data_collate
        from monai.transforms import apply_transform

        from .writer import output_path, write_label

        row = self._row(case, output_dir)
        start = time.perf_counter()
        stage = "reading/preprocessing"
        try:
            row["input_stat"] = input_stat(case)
            row["input_sha256"] = input_sha256(case)
            key = self.job.image_key
            data = {key: case.inputs[0] if len(case.inputs) == 1 else list(case.inputs)}
            item = self.preprocessing(data)
            image = item[key]
            meta = dict(getattr(image, "meta", {}) or {})
            self._check_image(image, case)
            stage = "inference"
            batch = list_data_collate([item])
            with torch.no_grad():
                pred = self.inferer(batch[key].to(self.device), self.network)
            batch["pred"] = pred
            out = decollate_batch(batch, detach=True)[0]
            stage = "postprocessing"
            for transform in self.post:
                out = apply_transform(transform, out)
            stage = "writing"
            reference = case.inputs[0] if case.kind == "nifti" else None
            spatial = meta.get("spatial_shape")
            affine = meta.get("original_affine", meta.get("affine"))
            dest = output_path(output_dir, case.case_id)
            digest = write_label(out[self.pred_key], dest, reference,
                                 None if affine is None else torch.as_tensor(affine).numpy(),
                                 None if spatial is None else tuple(int(s) for s in torch.as_tensor(spatial).tolist()))
            row.update(status="ok", output=str(dest), output_sha256=digest,
                       voxels=int(torch.as_tensor(out[self.pred_key]).numel()))
        except Exception as err:  # a bad case is a failed row, never a stopped cohort
            row["error"] = f"{stage}: {error_text(err)}"
            logger.warning("case %s failed: %s", case.case_id, row["error"])
        row["seconds"] = round(time.perf_counter() - start, 3)
        row["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return row

    def _check_image(self, image: Any, case: Case) -> None:
        import torch

        shape = tuple(getattr(image, "shape", ()))
        if len(shape) != 4:
            raise InputImageError(f"expected a 3D image with a channel axis after the bundle's preprocessing, "
                                  f"got shape {shape}")
        if self.job.in_channels is not None and shape[0] != self.job.in_channels:
            raise InputImageError(f"the bundle takes {self.job.in_channels} channel(s), this case has {shape[0]} "
                                  f"after its preprocessing (shape {shape})")
        if min(shape) == 0:
            raise InputImageError(f"image has an empty axis (shape {shape})")
        tensor = torch.as_tensor(image)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputImageError(f"image holds {int((~torch.isfinite(tensor)).sum())} NaN/Inf voxel(s)")
