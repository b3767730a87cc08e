"""The executor seam: N tiny runs through the local executor and through Ray on this machine,
the wall time of each, the per-task overhead of Ray and the ratio, measured in one process.

The local executor runs the tasks one after another with torch on every core; Ray runs as many
at once as it has CPUs (one CPU and one torch thread each). Ray's start (a local instance) is
timed apart from the tasks.

Run:  .venv/bin/python benchmarks/bench_executors.py [--tasks 8] [--cpus 2]
"""

import safeexport  # noqa: F401 - first: OpenMP's wait policy before torch loads (openmp.py)

# isort: split
import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from compressor import compress
from compressor.config import CompressConfig
from safeexport.executors import Task, run_tasks


def _tiny(out: str, seed: int) -> str:
    cfg = CompressConfig(dataset="synthetic", model="cnn", method="dense", epochs=2,
                         batch_size=32, max_samples=400, attack="loss", final_attack_epochs=2,
                         dense_reference=False, device="cpu")
    compress(replace(cfg, seed=seed), out, progress=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tasks = lambda tag: [Task(f"run {i}", _tiny, (str(Path(tmp) / tag / str(i)), i))  # noqa: E731
                             for i in range(args.tasks)]
        _tiny(str(Path(tmp) / "warm-up"), 99)  # imports and first-use costs, outside the timing
        t = time.perf_counter()
        local = run_tasks(tasks("local"), "local", False)
        t_local = time.perf_counter() - t
        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        t_start = time.perf_counter() - t
        t = time.perf_counter()
        remote = run_tasks(tasks("ray"), "ray", False, cpus_per_task=1)
        t_ray = time.perf_counter() - t
        ray.shutdown()
    assert all(o.ok for o in local + remote), [o.error for o in local + remote if not o.ok]
    per_local = t_local / args.tasks
    # the ideal of Ray's schedule is the local time per task on `cpus` workers at once
    overhead = (t_ray - per_local * args.tasks / args.cpus) / args.tasks
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads here, {args.cpus} CPUs "
          "for Ray")
    print(f"{args.tasks} tiny runs: local {t_local:6.1f} s ({per_local:5.2f} s per run); Ray "
          f"{t_ray:6.1f} s after a {t_start:4.1f} s start; ratio Ray/local "
          f"{t_ray / t_local:4.2f}; Ray's overhead against a perfect {args.cpus}-way split "
          f"{overhead:+5.2f} s per task")


if __name__ == "__main__":
    main()
