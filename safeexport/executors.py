"""The one seam through which many independent runs are made (the reference models, and the
runs of every method and seed of ``study --compare``): ``run_tasks(tasks, executor)`` runs each
task here one after another (``local``) or as Ray tasks (``ray``) and returns one ``Outcome``
per task, in order. A task that raises is reported with its error and the others go on;
nothing else in the code knows how tasks run."""

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from safeexport import names
from safeexport.errors import ConfigError, SafeExportError
from safeexport.openmp import policy_env
from safeexport.registry import Registry


@dataclass(frozen=True)
class Task:
    """``fn(*args, **kwargs)``, named for progress and error reports."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class Outcome:
    """What one task returned, or the one-line error it raised."""

    name: str
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _error_line(e: BaseException) -> str:
    return str(e) if isinstance(e, SafeExportError) else f"{type(e).__name__}: {e}"


def run_local(tasks: Sequence[Task], progress: bool | None = None, **options: Any
              ) -> list[Outcome]:
    """One task after another in this process (a task may itself use every core). It takes
    no options: one given (a Ray address, per-task resources) is refused, not dropped."""
    if options:
        raise ConfigError(f"the local executor takes no {', '.join(sorted(options))}; use "
                          "--executor ray for those")
    out = []
    with tqdm(total=len(tasks), desc="tasks", unit="task",
              disable=None if progress is None else not progress) as bar:
        for t in tasks:
            bar.set_postfix_str(t.name)
            try:
                out.append(Outcome(t.name, t.fn(*t.args, **t.kwargs)))
            except Exception as e:  # noqa: BLE001 - reported per task; the others go on
                out.append(Outcome(t.name, error=_error_line(e)))
            bar.update(1)
    return out


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with torch on ``threads`` CPU threads (None: unchanged), restoring the count
    after it."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _call_with_threads(fn: Callable[..., Any], args: tuple, kwargs: dict, threads: int) -> Any:
    """A task in a Ray worker: torch uses the cores Ray gave it, not every core of the node."""
    with torch_threads(threads):
        return fn(*args, **kwargs)


RAY_ADDRESS = re.compile(r"(?:ray://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})")


def ray_endpoint(address: str) -> tuple[str, int] | None:
    """The host and port a Ray address names (``HOST:PORT`` or ``ray://HOST:PORT``), None for
    ``auto`` and ``local`` (Ray finds those itself); anything else raises ConfigError."""
    if address in ("auto", "local"):
        return None
    m = RAY_ADDRESS.fullmatch(address)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ConfigError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT, auto "
                          "or local")
    return m["host"].strip("[]"), int(m["port"])


def check_ray_cluster(address: str | None) -> None:
    """Refuse, in seconds and before any work, a Ray cluster address where nothing answers:
    ``ray.init`` would retry it for as long as it was left running."""
    from safeexport.network import check_reachable

    endpoint = ray_endpoint(address) if address is not None else None
    if endpoint is not None:
        check_reachable(*endpoint, f"--ray-address {address}",
                        "start the cluster there (`ray start --head`) or fix the address")


RETRIES = 2  # Ray's retries of a task whose worker died


def run_ray(tasks: Sequence[Task], progress: bool | None = None, address: str | None = None,
            cpus_per_task: float = 1.0, gpus_per_task: float = 0.0) -> list[Outcome]:
    """Every task as a Ray task (``ray.remote`` with ``cpus_per_task``/``gpus_per_task``:
    scheduling labels, so a task must fit its share of a GPU's memory). Joins the running Ray
    instance of this process, or the cluster at ``address`` ("auto": the local node's), or
    starts a local instance that is shut down afterwards. Results come back in the tasks'
    order; a task that raised, or whose worker died ``RETRIES + 1`` times, is reported with
    its error while the others finish."""
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as e:  # "auto" with no cluster on this node
            raise ConfigError(f"--ray-address {address}: {str(e).splitlines()[0]}") from e
    try:
        # A worker starts with this process's OpenMP wait policy: it must be in the worker's
        # environment before the task imports torch (safeexport/openmp.py).
        # a worker that dies (killed, out of memory, its node lost) is retried RETRIES times
        # on a fresh one; an exception the task raised is its answer, not retried
        remote = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task,
                            max_retries=RETRIES, retry_exceptions=False,
                            runtime_env={"env_vars": policy_env()})(_call_with_threads)
        threads = max(1, int(cpus_per_task))
        pending = {remote.remote(t.fn, t.args, t.kwargs, threads): i
                   for i, t in enumerate(tasks)}
        out: list[Outcome | None] = [None] * len(tasks)
        with tqdm(total=len(tasks), desc="tasks (ray)", unit="task",
                  disable=None if progress is None else not progress) as bar:
            waiting = list(pending)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                i = pending[done[0]]
                try:
                    out[i] = Outcome(tasks[i].name, ray.get(done[0]))
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if isinstance(e.cause, BaseException) else e
                    out[i] = Outcome(tasks[i].name, error=_error_line(cause))
                except ray.exceptions.RayError as e:  # the worker or its node died
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    out[i] = Outcome(tasks[i].name, error=(
                        f"its Ray worker died {RETRIES + 1} times ({type(e).__name__}: "
                        f"{first}); a run it was writing is left unfinished (no report.json) "
                        "and the same command resumes it"))
                failed = sum(1 for o in out if o is not None and not o.ok)
                bar.set_postfix_str(f"running {len(waiting)}, failed {failed}")
                bar.update(1)
        return [o for o in out if o is not None]
    finally:
        if started:
            ray.shutdown()


def _write_probe(folder: str, name: str, token: str) -> str:
    """In a worker: write ``token`` into ``folder/name``; the worker's host name."""
    import socket

    (Path(folder) / name).write_text(token)
    return socket.gethostname()


def check_workers_write(folder: Path, **options: Any) -> None:
    """Refuse, in one line and before any training, an output ``folder`` that a Ray worker
    cannot write, or that the workers see on another filesystem than this process (a cluster
    without shared storage): one probe task writes a file into the nearest folder of
    ``folder`` that exists (nothing is created), this process reads it back and removes it.
    ``options``: run_ray's (the cluster's address)."""
    import uuid

    token = uuid.uuid4().hex
    name = f".safeexport-probe-{token}"
    where = next(p for p in (folder.resolve(), *folder.resolve().parents) if p.exists())
    [out] = run_ray([Task("probe", _write_probe, (str(where), name, token))], False, **options)
    probe = where / name
    try:
        if not out.ok:
            raise ConfigError(f"a Ray worker cannot write into {where} ({out.error}); give "
                              "--out a folder every worker can write")
        if not probe.is_file() or probe.read_text() != token:
            raise ConfigError(f"a Ray worker (on {out.value}) wrote into {where} on another "
                              "filesystem than this machine's; give --out a folder every node "
                              "mounts at the same path")
    finally:
        with contextlib.suppress(OSError):  # not written, or not where this process looks
            probe.unlink(missing_ok=True)


EXECUTORS: Registry[Callable[..., list[Outcome]]] = Registry("executor")
EXECUTORS.register("local", run_local)
EXECUTORS.register("ray", run_ray)
EXECUTORS.check(names.EXECUTORS)


def run_tasks(tasks: Sequence[Task], executor: str = "local", progress: bool | None = None,
              **options: Any) -> list[Outcome]:
    """Run ``tasks`` with the named executor (``options``: the Ray executor's address and
    per-task resources); one ``Outcome`` per task, in the tasks' order."""
    return EXECUTORS.get(executor)(tasks, progress, **options)
