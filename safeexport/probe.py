"""``python -m safeexport.probe FILE RUNTIME SAMPLE.npy``: load FILE in RUNTIME and run the
sample through it, in a process of its own (see ``safeexport.runtimes.probe_in_child``).
Exit status 0 when it ran, 2 with one line on stderr when the runtime refused the file; a
native crash shows as the signal that ended this process, with the runtime's own stderr."""

import os
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> int:
    """Probe one file; see the module docstring."""
    os.environ["SAFEEXPORT_KEEP_STDERR"] = "1"  # let the runtime's last words reach the parent
    from safeexport.errors import SafeExportError
    from safeexport.runtimes import open_runtime

    path, runtime, sample = argv
    try:
        with open_runtime(Path(path), runtime, 1) as rt:
            rt(np.load(sample, allow_pickle=False))
    except SafeExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
