"""Embedded mode: N worker processes on this machine, each holding one engine (``CaseRunner``).

Each worker is a process started by a fork server that has imported torch and MONAI once, with its own
pipe; the driver sends one case at a time and watches both the pipe and the process sentinel, so a worker
that dies in the middle of a case (killed, out of memory) is noticed at once and that case alone is handed
back for a retry. Workers die with the
driver (``PR_SET_PDEATHSIG``), so killing the command leaves no worker writing.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
from multiprocessing.connection import Connection, wait
from typing import Any

from .bundle_job import BundleJob
from .errors import WorkerStartError
from .sources import Case

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 900.0
# imported once by the fork server, so each worker (and each replacement of a dead one) starts in a fraction of
# a second instead of importing torch and MONAI again; nothing here starts threads or loads an engine
PRELOAD = ["torch", "monai.transforms", "monai.data", "monai.inferers", "medptq_monai.cohort.pipeline"]


def _context() -> mp.context.BaseContext:
    """``forkserver`` (with ``PRELOAD``) where available, else ``spawn``: never a plain fork of a threaded driver."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _prctl(option: int, value: object) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)
    except (OSError, AttributeError):  # not Linux: nothing to do
        pass


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no-op elsewhere)."""
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _set_name(name: bytes) -> None:
    """The process name ``ps``/``top`` show (15 bytes): ``medptq-idle`` or ``medptq-case`` while it runs a case."""
    _prctl(15, name)  # PR_SET_NAME


def _worker_main(conn: Connection, job: BundleJob, threads: int | None, cpus: list[int] | None) -> None:
    """Worker process: load the engine, report ``ready``, then run cases until told to stop."""
    _die_with_parent()
    if os.getppid() == 1:
        return
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass
    from .pipeline import CaseRunner, limit_threads

    limit_threads(threads)
    try:
        runner = CaseRunner(job, threads)
    except BaseException as err:  # reported to the driver, which stops the run
        from .pipeline import error_text

        conn.send(("error", error_text(err)))
        return
    conn.send(("ready", runner.describe()))
    while True:
        _set_name(b"medptq-idle")
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        case, output_dir = message
        _set_name(b"medptq-case")
        row = runner.run(case, output_dir)
        conn.send(("row", row))


class LocalPool:
    """``size`` worker processes; ``submit(slot, case)`` and ``poll`` as the scheduler expects."""

    kind = "embedded"

    def __init__(self, job: BundleJob, size: int, threads: int | None, pin_cpus: bool = True) -> None:
        self.job, self.size, self.threads = job, int(size), threads
        self._ctx = _context()
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        per = int(threads or 0)
        self._cpus: list[list[int] | None] = [
            cpus[i * per:(i + 1) * per] if pin_cpus and per and len(cpus) >= per * self.size else None
            for i in range(self.size)
        ]
        if per and len(cpus) < per * self.size:
            logger.warning("%d worker(s) x %d thread(s) oversubscribe the %d core(s) this process may use",
                           self.size, per, len(cpus))
        self._procs: list[Any] = [None] * self.size
        self._conns: list[Connection | None] = [None] * self.size
        self.workers: list[dict[str, str]] = [{} for _ in range(self.size)]
        try:
            for slot in range(self.size):
                self._spawn(slot)
            for slot in range(self.size):
                self._await_ready(slot)
        except BaseException:
            self.close()
            raise

    def _spawn(self, slot: int) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.job, self.threads, self._cpus[slot]),
                                 name=f"medptq-cohort-worker-{slot}", daemon=True)
        proc.start()
        child.close()
        self._procs[slot], self._conns[slot] = proc, parent

    def _await_ready(self, slot: int) -> None:
        conn, proc = self._conns[slot], self._procs[slot]
        ready = wait([conn, proc.sentinel], timeout=READY_TIMEOUT_S)
        if conn in ready:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                proc.join(timeout=5)
                kind, payload = "error", f"worker exited with code {proc.exitcode} while loading the engine"
        elif proc.sentinel in ready:
            proc.join(timeout=5)
            kind, payload = "error", f"worker exited with code {proc.exitcode} while loading the engine"
        else:
            kind, payload = "error", f"worker did not load the engine within {READY_TIMEOUT_S:.0f} s"
        if kind != "ready":
            raise WorkerStartError(f"a worker could not load the bundle's engine: {payload}")
        self.workers[slot] = dict(payload)

    def submit(self, slot: int, case: Case, output_dir: str) -> None:
        """Send ``case`` to the idle worker ``slot``."""
        self._conns[slot].send((case, output_dir))

    def poll(self, busy: set[int], timeout: float) -> list[tuple[int, str, Any]]:
        """Wait up to ``timeout`` s; return ``(slot, 'row', row)`` for finished cases and ``(slot, 'lost', why)``
        for workers that died in a case."""
        handles: dict[Any, int] = {}
        for slot in busy:
            handles[self._conns[slot]] = slot
            handles[self._procs[slot].sentinel] = slot
        events: list[tuple[int, str, Any]] = []
        done: set[int] = set()
        for handle in wait(list(handles), timeout=timeout):
            slot = handles[handle]
            if slot in done:
                continue
            conn = self._conns[slot]
            if conn.poll():
                try:
                    kind, payload = conn.recv()
                    events.append((slot, kind, payload))
                    done.add(slot)
                    continue
                except (EOFError, OSError):
                    pass
            proc = self._procs[slot]
            proc.join(timeout=5)
            if proc.exitcode is not None:
                code = proc.exitcode
                why = f"signal {-code}" if code < 0 else f"exit code {code}"
                events.append((slot, "lost", f"worker {self.workers[slot].get('worker', slot)} died ({why})"))
                done.add(slot)
        return events

    def restart(self, slot: int) -> None:
        """Replace a dead worker with a fresh one (loads the engine again)."""
        conn = self._conns[slot]
        if conn is not None:
            conn.close()
        self._spawn(slot)
        self._await_ready(slot)

    def close(self) -> None:
        """Stop every worker."""
        for slot, conn in enumerate(self._conns):
            if conn is not None:
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
        for proc in self._procs:
            if proc is not None:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5)
        for conn in self._conns:
            if conn is not None:
                conn.close()
        self._conns = [None] * self.size
