"""``run_cohort``: check everything, skip what is done, run the rest on local processes or Ray, report.

Order: bundle and names (``prepare_job``), cases (``discover_cases``), output folder, Ray address, then
the workers load their engines; only then is anything written (the output folder, its lock, the
manifest). Any of these failing raises a ``MedPTQError`` and writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomic
from .bundle_job import BundleJob, prepare_job
from .errors import OptionError, OutputDirError
from .manifest import Manifest, is_done
from .report import summarize, summary_lines
from .sources import Case, discover_cases, input_sha256, input_stat
from .writer import output_path, temporary_leftovers

logger = logging.getLogger(__name__)

LOCK_NAME = ".medptq-infer.lock"
SUMMARY_NAME = "summary.json"
DEFAULT_MAX_ATTEMPTS = 2


def check_output_dir(output_dir: Path, source: Path) -> None:
    """``OutputDirError`` when ``output_dir`` is inside the input folder, is a file, or cannot be written."""
    out, src = output_dir.resolve(), source.resolve()
    if src.is_dir() and (out == src or src in out.parents):
        raise OutputDirError(f"the output folder {out} is inside the input folder {src}: outputs would be read "
                             "as inputs by the next run; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"the output folder {out} is a file")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"cannot create the output folder {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"the output folder {out} is not writable ({existing} denies writing)")
    if existing == out:
        try:  # os.access says yes to root even on some read-only mounts: try it
            fd, probe = tempfile.mkstemp(prefix=".medptq-probe-", dir=out)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise OutputDirError(f"the output folder {out} is not writable: {err}") from err


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder (two runs never write the same manifest). The hidden lock file
    stays (removing it would let a third run lock a new file while a second still holds the old one); the
    lock itself goes with the process, so a killed run never blocks the next."""
    path = output_dir / LOCK_NAME
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise OutputDirError(f"another `medptq infer` is writing to {output_dir} (lock {path})") from err
        yield


def _remove_leftovers(output_dir: Path, case_id: str | None = None) -> int:
    removed = 0
    for path in temporary_leftovers(output_dir):
        if case_id is None or path.name.startswith(f".{output_path(output_dir, case_id).name}."):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def _pool_sizes(workers: int | None, threads: int | None, cpus: int) -> tuple[int, int]:
    if workers is not None and int(workers) < 1 or threads is not None and int(threads) < 1:
        raise OptionError(f"--workers and --threads must be >= 1, got {workers} and {threads}")
    size = int(workers) if workers else 1
    return size, int(threads) if threads else max(1, cpus // size)


def _make_pool(job: BundleJob, workers: int | None, threads: int | None, ray_address: str | None,
               ray_timeout: float) -> Any:
    if ray_address:
        from .ray_pool import RayPool, connect

        ray = connect(str(ray_address), ray_timeout)
        total = int(ray.cluster_resources().get("CPU", 1))
        per = int(threads) if threads else max(1, min(2, total))
        size = int(workers) if workers else max(1, total // per)
        _pool_sizes(size, per, total)
        return RayPool(job, size, per)
    from .local_pool import LocalPool

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    size, per = _pool_sizes(workers, threads, cpus)
    return LocalPool(job, size, per)


def run_cohort(
    bundle: str | os.PathLike,
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    engine: str = "auto",
    precision: str = "int8",
    workers: int | None = None,
    threads: int | None = None,
    ray_address: str | None = None,
    force: bool = False,
    data_list_key: str = "testing",
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    progress: bool = True,
    ray_timeout: float = 20.0,
    echo: bool = True,
) -> dict[str, Any]:
    """Segment every case of ``input`` with the bundle's engine into ``output_dir``; return the run's summary.

    Cases already ``ok`` for the same input and model sha256 (with intact outputs) are skipped unless ``force``.
    A case whose worker dies is retried up to ``max_attempts`` times in all, then recorded as failed.
    """
    job = prepare_job(bundle, engine, precision)
    source = Path(input)
    cases = discover_cases(source, data_list_key, job.image_key)
    out = Path(output_dir).resolve()
    check_output_dir(out, source)
    _pool_sizes(workers, threads, 1)
    manifest = Manifest(out)
    stats = {c.case_id: input_stat(c) for c in cases}
    todo: list[Case] = []
    done: list[Case] = []
    for case in cases:
        finished = not force and is_done(manifest.get(case.case_id), job.model_sha256, stats[case.case_id],
                                         lambda case=case: _sha_or_none(case))
        (done if finished else todo).append(case)
    started = time.perf_counter()
    pool = _make_pool(job, workers, threads, ray_address, ray_timeout) if todo else None
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    retries = 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        with output_lock(out):
            _remove_leftovers(out)
            manifest.compact()
            for case in done:
                manifest.append({**manifest.get(case.case_id), "status": "skipped", "error": None,
                                 "input": case.input_field(), "input_stat": stats[case.case_id]})
            if pool is not None:
                retries = _schedule(pool, todo, manifest, out, rows, max(1, int(max_attempts)), progress)
            _remove_leftovers(out)
            manifest.compact()
            info = pool.workers[0] if pool is not None and pool.workers else {}
            summary = summarize(rows, len(done), time.perf_counter() - start, retries, {
                "mode": getattr(pool, "kind", "none"), "workers": getattr(pool, "size", 0),
                "threads": getattr(pool, "threads", 0), "engine": info.get("engine", job.engine),
                "precision": info.get("precision", job.precision), "isa": info.get("isa", "n/a"),
                "model_file": job.model_file, "model_sha256": job.model_sha256, "bundle": job.bundle,
                "input": str(source.resolve()), "manifest": str(manifest.path),
                "startup_seconds": round(start - started, 3),
            })
            write_text_atomic(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    finally:
        if pool is not None:
            pool.close()
    if echo:
        print("\n".join(summary_lines(summary)), flush=True)
    return summary


def _sha_or_none(case: Case) -> str | None:
    try:
        return input_sha256(case)
    except OSError:
        return None


def _schedule(pool: Any, todo: list[Case], manifest: Manifest, out: Path,
              rows: list[dict[str, Any]], max_attempts: int, progress: bool) -> int:
    """Keep every worker busy until each case has a row; returns how many cases were retried."""
    from tqdm.auto import tqdm

    queue: deque[Case] = deque(todo)
    idle = list(range(pool.size))[::-1]
    busy: dict[int, Case] = {}
    attempts: Counter[str] = Counter()
    counts = Counter()
    with tqdm(total=len(todo), unit="case", desc="medptq infer", disable=not progress, dynamic_ncols=True) as bar:
        while queue or busy:
            while queue and idle:
                slot, case = idle.pop(), queue.popleft()
                attempts[case.case_id] += 1
                pool.submit(slot, case, str(out))
                busy[slot] = case
            for slot, kind, payload in pool.poll(set(busy), timeout=1.0):
                case = busy.pop(slot)
                if kind == "row":
                    row = {**payload, "attempts": attempts[case.case_id]}
                    idle.append(slot)
                else:  # the worker died in this case: nothing of it is kept; retry it or record the failure
                    _remove_leftovers(out, case.case_id)
                    logger.warning("case %s: %s", case.case_id, payload)
                    pool.restart(slot)
                    idle.append(slot)
                    if attempts[case.case_id] < max_attempts:
                        counts["retried"] += 1
                        queue.appendleft(case)
                        bar.set_postfix(ok=counts["ok"], failed=counts["failed"], retried=counts["retried"])
                        continue
                    row = {"case": case.case_id, "input": case.input_field(), "input_sha256": None,
                           "status": "failed", "attempts": attempts[case.case_id],
                           "model_sha256": pool.job.model_sha256,
                           "error": f"worker lost {attempts[case.case_id]} time(s) in this case; last: {payload}"}
                manifest.append(row)
                rows.append(row)
                counts[row["status"]] += 1
                bar.update(1)
                bar.set_postfix(ok=counts["ok"], failed=counts["failed"], retried=counts["retried"])
    return counts["retried"]
