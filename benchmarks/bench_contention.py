"""Two jobs on a shared machine: the README's main command alone, then N copies at once, the
wall time of each and the ratio (goal: two at once <= 2.2x one alone), and whether every copy
wrote the same model (sha256 of model.safetensors).

Each job is a real ``safeexport compress`` process, started as a user starts it, so it runs
with the OpenMP spin count the project sets (safeexport/openmp.py). ``--spincount N`` starts
the jobs with ``GOMP_SPINCOUNT=N`` instead (a user's setting wins over the project's): 300000,
libgomp's own default, is how the project ran before it set one (expect many times 2x); 0 is
``OMP_WAIT_POLICY=PASSIVE``.

Run:  .venv/bin/python benchmarks/bench_contention.py [--jobs 2] [--spincount N] [-- ARGS]
      (ARGS: extra `safeexport compress` options, e.g. -- --epochs 10)
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safeexport.openmp import SPIN_COUNT, USER_KEYS

SAFEEXPORT = Path(sys.executable).with_name("safeexport")


def _start(out: Path, extra: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(SAFEEXPORT), "compress", "--out", str(out), "--no-progress",
                             *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a job failed (exit {proc.returncode}): {err.strip()[-500:]}")


def _digest(run: Path) -> str:
    return hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()[:16]


def _batch(n: int, root: Path, extra: list[str], env: dict[str, str]) -> tuple[float, set]:
    """Wall time until all of ``n`` jobs started together have finished, and their models'
    digests."""
    runs = [root / f"job-{i}" for i in range(n)]
    t = time.perf_counter()
    procs = [_start(r, extra, env) for r in runs]
    for p in procs:
        _finish(p)
    return time.perf_counter() - t, {_digest(r) for r in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="jobs at once (default 2)")
    parser.add_argument("--spincount", type=int,
                        help="start the jobs with GOMP_SPINCOUNT=N (libgomp's default is "
                             "300000: the behaviour before the project set its policy)")
    parser.add_argument("extra", nargs="*", help="extra `safeexport compress` options")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in USER_KEYS}
    if args.spincount is not None:
        env["GOMP_SPINCOUNT"] = str(args.spincount)
    setting = (f"GOMP_SPINCOUNT={args.spincount}" if args.spincount is not None
               else f"the project's GOMP_SPINCOUNT={SPIN_COUNT}")
    with tempfile.TemporaryDirectory() as tmp:
        alone, d1 = _batch(1, Path(tmp) / "alone", args.extra, env)
        together, dn = _batch(args.jobs, Path(tmp) / "together", args.extra, env)
    same = "identical" if d1 == dn else f"DIFFERENT ({sorted(d1 | dn)})"
    print(f"safeexport compress {' '.join(args.extra)} on {os.cpu_count()} cores, {setting}")
    print(f"one alone {alone:7.1f} s; {args.jobs} at once {together:7.1f} s for all; ratio "
          f"{together / alone:5.2f}x one alone (ideal {args.jobs:.1f}x on shared cores); "
          f"models {same}")


if __name__ == "__main__":
    main()
