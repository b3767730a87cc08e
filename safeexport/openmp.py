"""How long idle OpenMP threads spin, set before torch starts its OpenMP runtime (torch-free on
purpose).

torch's CPU build runs its own kernels, MKL's and oneDNN's on GNU OpenMP (libgomp), whose idle
threads spin ``GOMP_SPINCOUNT`` = 300,000 times before they sleep (``OMP_DISPLAY_ENV=verbose``
prints it). Alone that saves a wake-up between parallel regions; with two jobs on two cores the
spinning threads steal each other's time, and the README's main command ran about 28x slower
twice at once than alone. Measured on the 2-core machine with ``bench_contention.py`` (the
figures are in docs/development.md): ``OMP_WAIT_POLICY=PASSIVE`` (spin count 0) ends the
collapse but makes a job ALONE about 45% slower (each parallel region wakes sleeping threads);
a spin of 3,000 keeps a job alone within the run-to-run noise of before and two at once at
about 2.1x one alone; 1,000 (what libgomp itself uses when it sees more threads than cores)
ran two at once faster still but one alone slower; 10,000 and more brought the collapse back.
The project sets ``GOMP_SPINCOUNT`` to ``SPIN_COUNT``.

libgomp reads its environment once, when torch loads it, so this must run before the first
``import torch`` of the process: every package of the project calls it from its ``__init__``
(a package's ``__init__`` runs before any of its modules), and Ray workers get the same
variables through their runtime environment (``executors.run_ray``). A user's own
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept, and the thread count is never set here
(``OMP_NUM_THREADS``, ``--threads`` and torch's one thread per core stay as they are). Other
OpenMP runtimes (LLVM's libomp of torch's macOS builds) are not configured."""

import os
import sys
import warnings

SPIN_COUNT = "3000"
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_wait_policy() -> None:
    """Set ``GOMP_SPINCOUNT`` in this process's environment (and so its children's) unless the
    user chose a wait policy or a spin count. Warns, once, when torch is already loaded: then
    its OpenMP runtime has read its environment and keeps its long spin in this process."""
    if any(k in os.environ for k in USER_KEYS):
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    if "torch" in sys.modules:
        warnings.warn("torch was imported before safeexport, so its OpenMP threads spin long "
                      "while idle and two jobs on the same cores slow each other down many "
                      f"times over; import safeexport first, or start Python with "
                      f"GOMP_SPINCOUNT={SPIN_COUNT} in the environment", RuntimeWarning,
                      stacklevel=2)


def policy_env() -> dict[str, str]:
    """The wait policy or spin count of this process, for a worker process to start with."""
    return {k: os.environ[k] for k in USER_KEYS if k in os.environ}
