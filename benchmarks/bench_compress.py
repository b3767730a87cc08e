"""Compressor timings, as ratios measured in one run on this machine.

1. A masked SGD step (gradient masking + re-masking the weights) vs the plain dense step of the
   same model, for the small CNN and VGG16.
2. One attacker epoch on cached target outputs vs the same epoch if the target's outputs were
   recomputed every epoch (what caching saves).

Run:  .venv/bin/python benchmarks/bench_compress.py [--steps N]
"""

import argparse
import time

import numpy as np
import torch

from compressor.masking import Masking, init_masks, maskable
from compressor.train import BatchSampler, TrainState, make_optimizer, predict_logits, train_steps
from safeexport.attacks import NasrAttack, Signals
from safeexport.data.base import ArrayDataset
from safeexport.models import build_model, image_kwargs


def _dataset(n: int, shape: tuple[int, ...], classes: int = 10) -> ArrayDataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (n, *shape), dtype=np.uint8)
    return ArrayDataset("bench", "image", x, np.arange(n) % classes, classes)


def _time_steps(state: TrainState, ds: ArrayDataset, steps: int, batch: int) -> float:
    sampler = BatchSampler(np.arange(len(ds)), batch, torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy
    train_steps(state, ds, sampler, 3, loss, lambda i: 0.01, torch.device("cpu"))  # warm-up
    t = time.perf_counter()
    train_steps(state, ds, sampler, steps, loss, lambda i: 0.01, torch.device("cpu"))
    return (time.perf_counter() - t) / steps


def masked_vs_dense(name: str, shape: tuple[int, ...], steps: int, batch: int) -> None:
    ds = _dataset(batch * 4, shape)
    kwargs = image_kwargs(name, ds, np.arange(len(ds)))
    times = {}
    for label in ("dense", "masked", "dense ", "masked "):  # interleaved to share the noise
        torch.manual_seed(0)
        model = build_model(name, kwargs)
        masking = None
        if label.strip() == "masked":
            weights = [p for _, p in maskable(model)]
            masking = Masking(model, init_masks(weights, 0.05, torch.Generator().manual_seed(0)))
            masking.apply()
        state = TrainState(model, make_optimizer(model, "sgd", 0.01, 0.9, 5e-4), masking)
        times.setdefault(label.strip(), []).append(_time_steps(state, ds, steps, batch))
    dense, masked = min(times["dense"]), min(times["masked"])
    print(f"{name:9} {str(shape):13} batch {batch:4}: dense step {1e3 * dense:8.1f} ms, "
          f"masked step {1e3 * masked:8.1f} ms, ratio masked/dense {masked / dense:5.2f}")


def attacker_epoch(n: int, classes: int = 10) -> None:
    ds = _dataset(2 * n, (1, 28, 28), classes)
    model = build_model("cnn", image_kwargs("cnn", ds, np.arange(len(ds)))).eval()
    members, nonmembers = np.arange(n), np.arange(n, 2 * n)
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    sm = Signals.from_logits(predict_logits(model, ds, members, cpu), ds.y[members])
    sn = Signals.from_logits(predict_logits(model, ds, nonmembers, cpu), ds.y[nonmembers])
    forward = time.perf_counter() - t
    attack = NasrAttack(classes)
    attack.fit(sm, sn, 1, g)  # warm-up
    t = time.perf_counter()
    attack.fit(sm, sn, 3, g)
    epoch = (time.perf_counter() - t) / 3
    print(f"attacker epoch on {n}+{n} cached outputs: {1e3 * epoch:.1f} ms; recomputing the "
          f"target's outputs would add {1e3 * forward:.1f} ms per epoch "
          f"(uncached/cached = {(epoch + forward) / epoch:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    masked_vs_dense("cnn", (1, 28, 28), args.steps * 3, 128)
    masked_vs_dense("vgg16", (3, 32, 32), args.steps, 32)
    attacker_epoch(5000)


if __name__ == "__main__":
    main()
