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


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """The ``ray`` module, joined to this process's running instance, or to the cluster at
    ``address`` ("auto": the local node's), or to a local instance started here and shut
    down afterwards."""
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as e:  # "auto" with no cluster on this node
            raise ConfigError(f"--ray-address {address}: {str(e).splitlines()[0]}") from e
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _died(ray: Any, e: BaseException) -> bool:
    """Whether a task's error is its worker's (or node's) death, which Ray retried."""
    x = ray.exceptions
    return isinstance(e, (x.WorkerCrashedError, x.NodeDiedError, x.OutOfMemoryError))


def run_ray(tasks: Sequence[Task], progress: bool | None = None, address: str | None = None,
            cpus_per_task: float = 1.0, gpus_per_task: float = 0.0) -> list[Outcome]:
    """Every task as a Ray task (``ray.remote`` with ``cpus_per_task``/``gpus_per_task``:
    scheduling labels, so a task must fit its share of a GPU's memory), in ``ray_session``.
    Results come back in the tasks' order; a task that raised, or whose worker died
    ``RETRIES + 1`` times, is reported with its error while the others finish."""
    with ray_session(address) as ray:
        # A worker starts with this process's OpenMP wait policy: it must be in the worker's
        # environment before the task imports torch (safeexport/openmp.py). A worker that
        # dies (killed, out of memory, its node lost) is retried RETRIES times on a fresh
        # one; an exception the task raised is its answer, not retried.
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
                except ray.exceptions.RayError as e:  # Ray's own: not the task's answer
                    line = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                    out[i] = Outcome(tasks[i].name, error=(
                        f"its Ray worker died {RETRIES + 1} times ({line}); a run it was "
                        "writing is left unfinished (no report.json) and the same command "
                        "resumes it" if _died(ray, e) else line))
                failed = sum(1 for o in out if o is not None and not o.ok)
                bar.set_postfix_str(f"running {len(waiting)}, failed {failed}")
                bar.update(1)
        return [o for o in out if o is not None]


def _write_probe(folder: str, name: str, token: str) -> str:
    """On one node: write ``token`` into ``folder/name``; the node's host name."""
    import socket

    (Path(folder) / name).write_text(token)
    return socket.gethostname()


def _remove_probe(folder: str, name: str) -> None:
    (Path(folder) / name).unlink(missing_ok=True)


PROBE_TIMEOUT = 120  # s a node may take to write or remove its probe file


def check_workers_write(folder: Path, address: str | None = None) -> None:
    """Refuse, in one line and before any training, an output ``folder`` that a Ray node
    cannot write, or that a node sees on another file system than this process (a cluster
    without shared storage). One probe task per alive node (no CPU or GPU reserved, so it
    never waits behind the runs) writes a file of its own into the nearest folder of
    ``folder`` that exists (nothing is created); this process reads each back, and each node
    removes its own. Inside a Ray task it does nothing: the driver that started the task has
    probed. ``address``: the cluster's, as run_ray takes it."""
    import uuid

    absolute = folder.absolute()  # as the tasks will name it: symlinks are not followed
    where = next(p for p in (absolute, *absolute.parents) if p.exists())
    with ray_session(address) as ray:
        if ray.get_runtime_context().get_task_id() is not None:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        write, remove = (ray.remote(num_cpus=0, max_retries=0)(f)
                         for f in (_write_probe, _remove_probe))
        on = [{"scheduling_strategy": NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)}
              for n in ray.nodes() if n["Alive"]]
        tokens = [uuid.uuid4().hex for _ in on]
        names = [f".safeexport-probe-{t}" for t in tokens]
        writes = [write.options(**o).remote(str(where), n, t)
                  for o, n, t in zip(on, names, tokens, strict=True)]
        try:
            for ref, name, token in zip(writes, names, tokens, strict=True):
                try:
                    host = ray.get(ref, timeout=PROBE_TIMEOUT)
                except (ray.exceptions.RayError, TimeoutError) as e:
                    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
                    raise ConfigError(f"a Ray worker cannot write into {where} "
                                      f"({_error_line(cause)}); give --out a folder every "
                                      "node can write") from None
                probe = where / name
                seen = probe.is_file() and probe.read_text() == token
                if not seen:
                    raise ConfigError(f"a Ray worker on {host} wrote into {where} on another "
                                      "file system than this machine's; give --out a folder "
                                      "every node mounts at the same path")
        finally:
            ray.wait([remove.options(**o).remote(str(where), n)
                      for o, n in zip(on, names, strict=True)], num_returns=len(on),
                     timeout=PROBE_TIMEOUT)


EXECUTORS: Registry[Callable[..., list[Outcome]]] = Registry("executor")
EXECUTORS.register("local", run_local)
EXECUTORS.register("ray", run_ray)
EXECUTORS.check(names.EXECUTORS)


def run_tasks(tasks: Sequence[Task], executor: str = "local", progress: bool | None = None,
              **options: Any) -> list[Outcome]:
    """Run ``tasks`` with the named executor (``options``: the Ray executor's address and
    per-task resources); one ``Outcome`` per task, in the tasks' order."""
    return EXECUTORS.get(executor)(tasks, progress, **options)
