"""Cluster mode: the same job on Ray, one actor per worker, each holding one loaded engine.

Ray is optional (``pip install 'medptq-monai[cluster]'``); this module imports it only when a pool is
made. ``connect`` checks that the address answers (a TCP connect, then ``ray.init`` under a timeout),
so a wrong address is a clear error, not a hang. Each actor asks Ray for ``threads`` CPUs, so Ray never
places more engine threads on a node than it has cores. An actor that dies in a case (its process
killed, its node lost) is replaced and the case handed back to the scheduler for a retry. Inputs and
outputs are paths: every node must see them (a shared file system).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from .bundle_job import BundleJob
from .errors import ClusterError, WorkerStartError
from .sources import Case

RAY_PIN = "ray==2.60.0"
CONNECT_TIMEOUT_S = 20.0
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # tasks pass paths and rows, never volumes


def import_ray() -> Any:
    """The ``ray`` module, or ``ClusterError`` naming the extra to install."""
    try:
        import ray
    except ImportError as err:
        raise ClusterError(f"--ray_address needs Ray, which is not installed: pip install 'medptq-monai[cluster]' "
                           f"({RAY_PIN})") from err
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    text = address.split("://", 1)[-1]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


_CONNECTED: dict[str, str] = {}  # the address this module last connected to


def _connected_to(ray: Any, address: str) -> bool:
    """Whether the initialized Ray of this process is the cluster at ``address``."""
    if _CONNECTED.get("address") == address:
        return True
    if address in ("auto", "local") or "://" in address:
        return False
    try:
        current = _host_port(str(ray.get_runtime_context().gcs_address))
    except Exception:
        return False
    wanted = _host_port(address)
    loopback = ("127.0.0.1", "localhost")
    same_host = current is not None and wanted is not None and (
        current[0] == wanted[0] or (current[0] in loopback and wanted[0] in loopback))
    return bool(same_host and current[1] == wanted[1])


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """``ray.init`` on ``address`` (``host:port`` of a running cluster, ``ray://host:port``, ``auto``, or ``local``
    for a Ray instance started for this run); ``ClusterError`` within ``timeout`` s when it does not answer."""
    ray = import_ray()
    if ray.is_initialized():
        if _connected_to(ray, address):
            return ray
        ray.shutdown()  # connected elsewhere (an earlier run in this process): never run on the wrong cluster
    target = _host_port(address) if address not in ("auto", "local") else None
    if address not in ("auto", "local") and target is None:
        raise ClusterError(f"--ray_address {address!r} is not host:port, ray://host:port, auto or local")
    if target is not None:
        try:
            socket.create_connection(target, timeout=min(timeout, 5.0)).close()
        except OSError as err:
            raise ClusterError(f"no Ray cluster answers at {address} ({err}); start one with `ray start --head` or "
                               "check the address") from err
    if address == "local":
        # in this thread: Ray ties the processes it starts to the life of the thread that starts them
        try:
            ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     logging_level="WARNING", log_to_driver=False)
        except Exception as err:
            raise ClusterError(f"cannot start a local Ray instance: {type(err).__name__}: {err}") from err
        _CONNECTED["address"] = "local"
        return ray
    outcome: dict[str, Any] = {}

    def init() -> None:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            _CONNECTED["address"] = address
            outcome["ok"] = True
        except BaseException as err:  # reported below
            outcome["error"] = err

    thread = threading.Thread(target=init, name="medptq-ray-init", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ClusterError(f"the Ray cluster at {address} did not accept a connection within {timeout:.0f} s")
    if "error" in outcome:
        err = outcome["error"]
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {type(err).__name__}: "
                           f"{' '.join(str(err).split())[:400]}") from err
    return ray


class CaseActor:
    """Ray actor body: one ``CaseRunner`` (one engine) per actor process."""

    def __init__(self, job: BundleJob, threads: int | None) -> None:
        from .pipeline import CaseRunner

        self.runner = CaseRunner(job, threads)

    def describe(self) -> dict[str, str]:
        return self.runner.describe()

    def run(self, case: Case, output_dir: str) -> dict[str, Any]:
        return self.runner.run(case, output_dir)


class RayPool:
    """``size`` actors of ``threads`` CPUs each on the connected cluster; same ``submit``/``poll`` as ``LocalPool``."""

    kind = "ray"

    def __init__(self, job: BundleJob, size: int, threads: int, ready_timeout: float = 900.0) -> None:
        self.ray = import_ray()
        self.job, self.size, self.threads, self.ready_timeout = job, int(size), int(threads), ready_timeout
        cpus = float(self.ray.cluster_resources().get("CPU", 0))
        if self.size * self.threads > cpus:
            raise ClusterError(f"the Ray cluster has {cpus:g} CPUs; {self.size} worker(s) x {self.threads} thread(s) "
                               "do not fit (lower --workers or --threads)")
        self._remote = self.ray.remote(num_cpus=self.threads, max_restarts=0, max_task_retries=0)(CaseActor)
        self._actors: list[Any] = [None] * self.size
        self._refs: dict[Any, int] = {}
        self.workers: list[dict[str, str]] = [{} for _ in range(self.size)]
        try:
            pending = {self._start(slot): slot for slot in range(self.size)}
            for ref, slot in pending.items():
                self._await_ready(slot, ref)
        except BaseException:
            self.close()
            raise

    def _start(self, slot: int) -> Any:
        self._actors[slot] = self._remote.remote(self.job, self.threads)
        return self._actors[slot].describe.remote()

    def _await_ready(self, slot: int, ref: Any) -> None:
        ready, _ = self.ray.wait([ref], timeout=self.ready_timeout)
        if not ready:
            raise WorkerStartError(f"a Ray worker did not load the bundle's engine within {self.ready_timeout:.0f} s "
                                   "(is a node with enough free CPUs up?)")
        try:
            self.workers[slot] = dict(self.ray.get(ref))
        except Exception as err:
            from .pipeline import error_text

            raise WorkerStartError(f"a Ray worker could not load the bundle's engine: {error_text(err)}") from err

    def submit(self, slot: int, case: Case, output_dir: str) -> None:
        self._refs[self._actors[slot].run.remote(case, output_dir)] = slot

    def poll(self, busy: set[int], timeout: float) -> list[tuple[int, str, Any]]:
        if not self._refs:
            return []
        done, _ = self.ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        events = []
        for ref in done:
            slot = self._refs.pop(ref)
            try:
                events.append((slot, "row", self.ray.get(ref)))
            except self.ray.exceptions.RayActorError as err:
                events.append((slot, "lost", f"Ray worker {self.workers[slot].get('worker', slot)} died: "
                                             f"{' '.join(str(err).split())[:200]}"))
            except Exception as err:  # the task itself raised: not a case failure CaseRunner could report
                from .pipeline import error_text

                events.append((slot, "lost", f"Ray task failed: {error_text(err)}"))
        return events

    def restart(self, slot: int) -> None:
        try:
            self.ray.kill(self._actors[slot], no_restart=True)
        except Exception:
            pass
        self._await_ready(slot, self._start(slot))

    def close(self) -> None:
        for actor in self._actors:
            if actor is not None:
                try:
                    self.ray.kill(actor, no_restart=True)
                except Exception:
                    pass
        self._actors = [None] * self.size
