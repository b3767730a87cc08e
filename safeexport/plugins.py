"""A user's own code, named ``package.module:name`` on the command line or in a run's files
(a model factory, a Dataset factory): importing it from the working directory or PYTHONPATH.

A run only NAMES code, it never carries it; but importing a module runs it, and a run folder or
config received from someone else could name a module they placed beside it. So a reference is
imported only once trusted: named by the user in this process (``--model``, ``--dataset`` of
compress and study) or allowed for a recorded run or config with ``--trust-code``. Installed
plugins (entry points) are installed code and need no trust."""

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator

from safeexport.errors import ConfigError

_trusted: set[str] = set()


def trust(ref: str) -> None:
    """Allow ``import_object(ref)`` in this process: the user named it, or said to trust it."""
    _trusted.add(ref)


@contextlib.contextmanager
def user_code(name: str, error: type[Exception] = ConfigError) -> Iterator[None]:
    """Run a user's code (``name`` says whose, in the message): a ``sys.exit`` inside it
    becomes one ``error`` instead of ending the tool with nothing written and exit status 0.
    Ctrl-C (KeyboardInterrupt) passes through: the command line exits 130 on it."""
    try:
        yield
    except SystemExit as e:
        raise error(f"{name} called sys.exit({e.code!r}); a user's code must return or raise, "
                    "not end the process") from None


REF_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def is_ref(text: str) -> bool:
    """Whether ``text`` is written as ``package.module:name``."""
    return REF_RE.fullmatch(text) is not None


def import_object(ref: str, what: str):
    """The callable ``package.module:name`` names; ``what`` says what it is for in messages.
    The working directory is searched, as ``python -m`` does (a console script's own path
    does not include it)."""
    if not is_ref(ref):
        raise ConfigError(f"{what} {ref!r} is not of the form package.module:name")
    if ref not in _trusted:
        raise ConfigError(f"the {what} {ref} is named by a run or config file, and importing it "
                          "runs its code; if you trust where the file came from (e.g. you made "
                          "the run), pass --trust-code (API: trust_code=True)")
    module_name, attr = ref.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        with user_code(f"importing module {module_name} (the {what} {ref})"):
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's module can fail in any way on import
        raise ConfigError(f"cannot import the {what} {ref}: {type(e).__name__}: {e} (is its "
                          "folder the working directory or on PYTHONPATH?)") from e
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ConfigError(f"{what} {ref}: module {module_name} has no callable {attr!r}")
    return obj
