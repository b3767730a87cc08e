"""SafeCompress against pruning on the full purchase-like stand-in (5,000 records, 600 binary
features, 40 classes): test accuracy and the strongest attack of dense, prune and SafeCompress
at each density, and the ratio SafeCompress / prune (the goal: at least 0.9), measured in one
process. About two minutes on two cores.

Run:  .venv/bin/python benchmarks/bench_tabular.py [--epochs 20] [--optimizer auto|sgd|adamw]
(--optimizer sgd shows the cause measured in docs/results/tabular.md)
"""

import safeexport  # noqa: F401 - first: OpenMP's wait policy before torch loads (openmp.py)

# isort: split
import argparse
import json
import tempfile
from pathlib import Path

from compressor import compress
from compressor.config import CompressConfig
from safeexport import names


def _figures(cfg: CompressConfig, out: Path) -> dict:
    compress(cfg, out, progress=False)
    c = json.loads((out / "report.json").read_text())["compressed"]
    return {"test": c["task_acc"], "train": c["train_acc"], "attack": c["strongest"]["attack"],
            "mia": c["strongest"]["mia_acc"], "ci": c["strongest"]["ci"]["mia_acc"],
            "seconds": c["wall_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--optimizer", default="auto", choices=("auto", *names.OPTIMIZERS))
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = CompressConfig(dataset="purchase-like", epochs=args.epochs, optimizer=args.optimizer,
                          attack="loss", dense_reference=False, seed=args.seed, device="cpu")
    print(f"purchase-like, {args.epochs} epochs, optimizer {args.optimizer}, seed {args.seed}; "
          "strongest of the loss and threshold attacks (balanced accuracy)")
    print(f"{'method':<14}{'kept':>6}{'test':>8}{'train':>8}  {'MIA [95% CI]':<24}attack"
          f"{'s':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("dense", 1.0)] + [(m, d) for d in args.densities
                                   for m in ("prune", "safecompress")]
        got = {}
        for method, density in rows:
            cfg = CompressConfig.from_dict({**base.to_dict(), "method": method,
                                            "sparsity": density})
            f = got[method, density] = _figures(cfg, Path(tmp) / f"{method}-{density}")
            print(f"{method:<14}{density:>6.2f}{f['test']:>8.3f}{f['train']:>8.3f}"
                  f"  {f['mia']:.3f} [{f['ci'][0]:.3f}, {f['ci'][1]:.3f}]    {f['attack']:<17}"
                  f"{f['seconds']:>6.1f}")
    for d in args.densities:
        ratio = got["safecompress", d]["test"] / max(got["prune", d]["test"], 1e-9)
        print(f"kept {d:.2f}: SafeCompress / prune test accuracy {ratio:.2f} (goal >= 0.90)")


if __name__ == "__main__":
    main()
