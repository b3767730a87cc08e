"""Keeping third-party chatter off the user's terminal."""

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the converters' own chatter (progress lines, C++ logs on fd 1 and 2, warnings)
    so the command prints its table and errors only. SAFEEXPORT_KEEP_STDERR=1 keeps stderr:
    the crash probe's child sets it, so a runtime's message before an abort is not lost."""
    if os.environ.get("SAFEEXPORT_KEEP_STDERR") == "1":
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "wb") as null, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
