"""Where the heavy per-tensor and per-expert jobs run: in this process, or on a Ray cluster (``--ray``).

Conversion and calibration hand their expensive, independent work to a ``Workers`` as a list of jobs (a module-level
function and its arguments) and take the results back *in job order*, so the driver assembles exactly what a
single process would: the bytes of an export do not depend on where its jobs ran.

    LocalWorkers     runs each job here, when its result is taken (no parallelism, nothing to set up)
    RayWorkers       one Ray task per job (1 CPU each), at most ``window`` in flight; a task whose worker dies is
                     retried by Ray; results are taken in order

Jobs write their large outputs (quantized codes) as files into a folder the driver gives them, inside the output's
temporary folder; with Ray that folder must be on a filesystem every node sees, which ``RayWorkers`` checks before
any weight is read (a probe file the driver writes, read back by a task pinned to each alive node).

Test hook: ``L4EXPORT_RAY_KILL_JOB=N`` makes the worker running job N exit once (the first time), to show that a
lost worker is retried and does not change the result.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import CapabilityError, L4ExportError, UsageError

log = logging.getLogger(__name__)

KILL_ENV = "L4EXPORT_RAY_KILL_JOB"


class LocalWorkers:
    """Jobs run in this process, lazily and in order."""

    name = "local process"
    workers = 1

    def map(self, fn: Callable[..., Any], jobs: Iterable[tuple]) -> Iterator[Any]:
        for job in jobs:
            yield fn(*job)

    def close(self) -> None:
        return None


def _run_job(fn: Callable[..., Any], job: tuple, index: int, kill: tuple[int, str] | None) -> Any:
    """A Ray task (one thread: Ray sets OMP_NUM_THREADS=1 for a 1-CPU task), the test hook, then the job."""
    if kill is not None and kill[0] == index:
        marker = Path(kill[1])
        if not marker.exists():
            marker.write_text("killed once")
            os._exit(1)  # a lost worker: Ray retries the task on another one
    return fn(*job)


def _probe(path: str, token: str) -> bool:
    p = Path(path)
    return p.is_file() and p.read_text() == token


class RayWorkers:
    """Jobs as Ray tasks on the cluster at ``address`` (``local``: start one on this machine; ``auto``: join the
    running one; ``ray://host:port``: Ray Client). ``shared``: the folder jobs write into, checked on every node."""

    def __init__(self, address: str, shared: Path):
        try:
            import ray
        except ImportError:
            raise CapabilityError("--ray needs Ray, which is not installed: pip install 'l4export[distributed]'") from None

        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            self._init(address)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.window = 2 * self.workers
        self.name = f"Ray cluster at {address} ({self.workers} CPUs)"
        kill = os.environ.get(KILL_ENV)
        self.kill = (int(kill), str(Path(shared) / ".killed")) if kill else None
        self._remote = ray.remote(num_cpus=1, max_retries=3)(_run_job)
        self._check_shared(Path(shared))
        log.info("distributing over the %s", self.name)

    def _init(self, address: str) -> None:
        ray = self.ray
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
                                  "configure_logging": True}
        try:
            if address == "local":
                ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--ray {address}: cannot reach a Ray cluster ({first}); use 'local', 'auto' with a "
                             "running cluster (ray start --head), or ray://HOST:PORT") from None

    def _check_shared(self, folder: Path) -> None:
        """Every alive node must see ``folder`` (the jobs write there and the driver reads it back)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        probe = folder / ".probe"
        probe.write_text(token)
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        refs = [self.ray.remote(num_cpus=0)(_probe).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(probe), token)
            for n in nodes]
        seen = self.ray.get(refs)
        probe.unlink()
        missing = [n.get("NodeManagerAddress", "?") for n, ok in zip(nodes, seen) if not ok]
        if missing:
            self.close()
            raise UsageError(f"{folder}: not visible from Ray node(s) {', '.join(missing)}; the output folder must be "
                             "on a filesystem every node shares (NFS, Lustre, ...): choose such an -o")

    def map(self, fn: Callable[..., Any], jobs: Iterable[tuple]) -> Iterator[Any]:
        pending: deque = deque()
        for i, job in enumerate(jobs):
            pending.append(self._remote.remote(fn, job, i, self.kill))
            if len(pending) >= self.window:
                yield self._get(pending.popleft())
        while pending:
            yield self._get(pending.popleft())

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, L4ExportError):
                raise e.cause from None  # our one-line errors pass through as they are
            raise

    def close(self) -> None:
        if self.kill is not None and Path(self.kill[1]).exists():
            log.warning("test hook: the worker of job %d was killed once and Ray ran the job again", self.kill[0])
            Path(self.kill[1]).unlink()
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def workers_for(address: str | None, shared: Path) -> LocalWorkers | RayWorkers:
    """``LocalWorkers`` without an address, else ``RayWorkers`` on it (the shared folder checked)."""
    return LocalWorkers() if address is None else RayWorkers(address, shared)
