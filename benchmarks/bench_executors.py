"""The executor seam on a study grid: `study --compare` over methods x seeds of tiny runs, once
through the local executor and once through Ray, the wall time of each and the ratio, measured
in one process.

The local executor runs the grid's runs one after another with torch on every core; Ray runs
as many at once as it has CPUs (one CPU and one torch thread each). Ray's start (a local
instance, or joining --ray-address) is timed apart from the grid. On a 2-core machine expect
parity, not a speed-up: the local runs already keep both cores busy.

Run:  .venv/bin/python benchmarks/bench_executors.py [--methods dense,prune,safecompress]
      [--seeds 2] [--cpus 2]
A cluster:  ray start --head (on the head node), ray start --address HEAD_IP:6379 (on every
other node), then  ... bench_executors.py --ray-address HEAD_IP:6379 --out /shared/bench
(--out: a folder every node mounts at the same path; the grid's runs are written there)
"""

import safeexport  # noqa: F401 - first: OpenMP's wait policy before torch loads (openmp.py)

# isort: split
import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from compressor.config import CompressConfig
from study import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dense,prune,safecompress")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10, help="each run's (its size)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--ray-address", default=None, help="join this cluster instead")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the grids' runs go (default: a temporary folder)")
    args = parser.parse_args()
    import ray

    methods = args.methods.split(",")
    cfg = CompressConfig(dataset="synthetic", model="cnn", epochs=args.epochs,
                         update_frequency=20, batch_size=32, max_samples=800, attack="loss",
                         final_attack_epochs=2, retrain_epochs=2, dense_reference=False,
                         device="cpu")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty: its finished runs would be reused, and "
                     "nothing timed")
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-executors-"))
    try:
        compare(cfg, root / "warm-up", methods[:1], progress=False)  # first-use costs
        t = time.perf_counter()
        compare(cfg, root / "local", methods, args.seeds, progress=False)
        t_local = time.perf_counter() - t
        t = time.perf_counter()
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
                 **({} if args.ray_address else {"num_cpus": args.cpus}))
        t_start = time.perf_counter() - t
        cpus = int(ray.cluster_resources().get("CPU", 0))
        t = time.perf_counter()
        compare(replace(cfg, executor="ray", ray_address=args.ray_address), root / "ray",
                methods, args.seeds, progress=False)
        t_ray = time.perf_counter() - t
        ray.shutdown()
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    runs = len(methods) * args.seeds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads here; Ray: "
          f"{'cluster ' + args.ray_address if args.ray_address else 'local instance'}, "
          f"{cpus} CPUs")
    print(f"study grid {'+'.join(methods)} x {args.seeds} seeds ({runs} runs, each seed's "
          f"dense run first): local {t_local:6.1f} s; Ray {t_ray:6.1f} s after a "
          f"{t_start:4.1f} s start; ratio Ray/local {t_ray / t_local:4.2f}")


if __name__ == "__main__":
    main()
