"""A user's own code, named ``package.module:name`` on the command line or in a run's files
(a model factory, a Dataset factory): importing it from the working directory or PYTHONPATH.
A run only NAMES code that is already installed or on the path; it never carries code."""

import importlib
import os
import re
import sys

from safeexport.errors import ConfigError

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
    module_name, attr = ref.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - a user's module can fail in any way on import
        raise ConfigError(f"cannot import the {what} {ref}: {type(e).__name__}: {e} (is its "
                          "folder the working directory or on PYTHONPATH?)") from e
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ConfigError(f"{what} {ref}: module {module_name} has no callable {attr!r}")
    return obj
