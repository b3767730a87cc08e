"""The one seam through which many independent runs are made (reference models today; the
study's rows and seeds, and a Ray executor, behind the same call later): ``run_tasks(tasks)``
runs each task and returns one ``Outcome`` per task, in order. A task that raises is reported
with its error and the others go on; nothing else in the code knows how tasks run."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from safeexport.errors import SafeExportError
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


def run_local(tasks: Sequence[Task], progress: bool | None = None) -> list[Outcome]:
    """One task after another in this process (a task may itself use every core)."""
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


EXECUTORS: Registry[Callable[..., list[Outcome]]] = Registry("executor")
EXECUTORS.register("local", run_local)


def run_tasks(tasks: Sequence[Task], executor: str = "local",
              progress: bool | None = None) -> list[Outcome]:
    """Run ``tasks`` with the named executor; one ``Outcome`` per task, in the tasks' order."""
    return EXECUTORS.get(executor)(tasks, progress)
