"""The measuring instrument's cost and strength, measured in one run on this machine.

1. The final membership evaluation on 10,000 signals (4,000 + 2,000 known members/non-members
   to train on, 2,000 + 2,000 unknown ones to measure), with a known confidence gap: the time of
   the trained attacker, of the threshold attacks, and of the bootstrap intervals, each as a
   share of the whole.
2. With ``--run RUN``: the trained attacker (``--seeds`` seeds, mean ± std) against every
   threshold attack on that run's model, each with its 95% bootstrap interval.

Run:  .venv/bin/python benchmarks/bench_attack.py [--run runs/fmnist-cnn-0.05] [--seeds 3]
"""

import safeexport  # noqa: F401 - first: OpenMP's wait policy before torch loads (openmp.py)

# isort: split
import argparse
import time

import numpy as np
import torch

from safeexport.attacks import Signals
from safeexport.attacks.final import final_membership
from safeexport.attacks.threshold import threshold_attacks
from safeexport.data.splits import Splits, balanced
from safeexport.metrics import mia_metrics
from safeexport.plots import fmt_interval


def _gap_logits(n: int, member: np.ndarray, rng: np.random.Generator,
                classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(n) % classes
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), y] += np.where(member, rng.normal(5.0, 1.5, n), rng.normal(3.5, 2.0, n))
    return logits, y


def cost(seeds: int) -> None:
    rng = np.random.default_rng(0)
    parts = {"known_members": 4000, "known_nonmembers": 2000, "unknown_members": 2000,
             "unknown_nonmembers": 2000, "validation": 1, "test": 1}
    idx, start = {}, 0
    for k, n in parts.items():
        idx[k] = np.arange(start, start + n)
        start += n
    member = np.zeros(start, bool)
    member[np.r_[idx["known_members"], idx["unknown_members"]]] = True
    logits, y = _gap_logits(start, member, rng)
    splits = Splits(fingerprint="bench", **idx)
    t = time.perf_counter()
    res = final_membership(lambda i: logits[i], y, splits, 10, "nasr", 300, 0, "bench",
                           torch.device("cpu"), seeds)
    whole = time.perf_counter() - t
    # the parts, timed again on the same signals
    um, un = balanced(splits.unknown_members, splits.unknown_nonmembers)
    t = time.perf_counter()
    mia_metrics(res.scores, res.is_member)
    one_interval = time.perf_counter() - t
    intervals = one_interval * len(res.results)
    t = time.perf_counter()
    sig = [Signals.from_logits(logits[i], y[i]) for i in
           (splits.known_members, splits.known_nonmembers, um, un)]
    threshold_attacks(*sig, resamples=0)
    thresholds = time.perf_counter() - t
    attacker = whole - intervals - thresholds
    print(f"final evaluation of 10,000 signals, {seeds} attacker seed(s): {whole:.1f} s; "
          f"trained attacker {attacker:.1f} s ({attacker / whole:.0%}), threshold attacks "
          f"{thresholds:.2f} s ({thresholds / whole:.0%}), bootstrap intervals of "
          f"{len(res.results)} attacks {intervals:.1f} s ({intervals / whole:.0%})")
    print(f"  nasr MIA {fmt_interval(res.metrics, 'mia_acc')}, best "
          f"threshold {max(r.metrics['mia_acc'] for r in res.results.values()):.4f}")


def on_run(path: str, seeds: int) -> None:
    from safeexport.runio import inputs_of, load_data, load_model, open_run
    from safeexport.runtimes import open_runtime

    run = open_run(path)
    ds, splits = load_data(run)
    cfg = run.read_config()["config"]
    load_model(run)  # checks that the weights fit the recorded architecture
    x = inputs_of(ds, np.arange(len(ds)))
    with open_runtime(run.model, "torch") as rt:
        logits = rt(x)
    t = time.perf_counter()
    res = final_membership(lambda i: logits[i], ds.y, splits, ds.num_classes, "nasr",
                           cfg["final_attack_epochs"], cfg["seed"], "compressed",
                           torch.device("cpu"), seeds)
    print(f"{path}: {res.metrics['n_members']}+{res.metrics['n_nonmembers']} unknown members/"
          f"non-members, {time.perf_counter() - t:.0f} s")
    print(f"{'attack':18}{'MIA acc':>9}{'95% interval':>18}{'AUC':>8}{'95% interval':>18}")
    for name, r in res.results.items():
        m = r.metrics
        print(f"{name:18}{m['mia_acc']:9.4f}  [{m['ci']['mia_acc'][0]:.4f}, "
              f"{m['ci']['mia_acc'][1]:.4f}]{m['auc']:8.4f}  [{m['ci']['auc'][0]:.4f}, "
              f"{m['ci']['auc'][1]:.4f}]")
    if res.seeds:
        for key in ("mia_acc", "auc"):
            s = res.seeds[key]
            print(f"nasr over {seeds} seeds: {key} {s['mean']:.4f} ± {s['std']:.4f} "
                  f"({', '.join(f'{v:.4f}' for v in s['values'])})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a finished run directory to attack")
    ap.add_argument("--seeds", type=int, default=3, help="attacker seeds")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cost(1)
    if args.run:
        on_run(args.run, args.seeds)


if __name__ == "__main__":
    main()
