"""Compressor timings, as ratios measured in one run on this machine.

1. A masked SGD step (gradient masking + re-masking the weights) vs the plain dense step of the
   same model, for the small CNN and VGG16.
2. One attacker epoch on cached target outputs vs the same epoch if the target's outputs were
   recomputed every epoch (what caching saves).

3. SafeCompress against the dense model on the same budget, one digits run (``--ratio``): the
   wall-time ratio the report records, and where SafeCompress's time goes (cProfile's
   cumulative time of the training steps, the candidates' fine-tuning, the attacker's fits and
   the target's inference), to show what a faster SafeCompress must cut.

Run:  .venv/bin/python benchmarks/bench_compress.py [--steps N]
      .venv/bin/python benchmarks/bench_compress.py --ratio [--dataset D] [--set KEY=VALUE ...]
"""

import safeexport  # noqa: F401 - first: OpenMP's wait policy before torch loads (openmp.py)

# isort: split
import argparse
import time

import numpy as np
import torch

from compressor.masking import Masking, init_masks, maskable
from compressor.train import BatchSampler, TrainState, make_optimizer, predict_logits, train_steps
from safeexport.attacks import NasrAttack, Signals
from safeexport.config import parse_setting
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


# (label, module file suffix, function): cumulative times over the whole command, so they
# overlap (a candidate's attacker fit is inside the mask updates and inside the attacker fits)
PHASES = [("SafeCompress loop", "compressor/run.py", "_safecompress"),
          ("mask updates (all rounds)", "compressor/safecompress.py", "mask_update"),
          ("candidates: fine-tune + test", "compressor/safecompress.py", "make_candidate"),
          ("attacker fits (loop and final)", "safeexport/attacks/nasr.py", "fit"),
          ("target inference (all)", "compressor/train.py", "predict_logits"),
          ("final evaluations (both models)", "compressor/run.py", "final_evaluation")]


def safecompress_vs_dense(dataset: str, settings: dict) -> None:
    import cProfile
    import json
    import pstats
    import tempfile
    from collections import Counter
    from pathlib import Path

    from compressor import compress
    from compressor.config import CompressConfig

    with tempfile.TemporaryDirectory() as tmp:
        profile = cProfile.Profile()
        t = time.perf_counter()
        cfg = CompressConfig(dataset=dataset, device="cpu", **settings)
        run = profile.runcall(compress, cfg, Path(tmp) / "run", progress=False)
        wall = time.perf_counter() - t
        report = json.loads(run.report.read_text())
        history = run.read_history()
    sc, dense = report["compressed"]["wall_time_s"], report["dense"]["wall_time_s"]
    shown = " ".join(f"{k}={v}" for k, v in settings.items())
    print(f"{dataset} {shown}: SafeCompress {sc:.1f} s, dense {dense:.1f} s on the same "
          f"budget: ratio {sc / dense:.2f}x (whole command {wall:.1f} s, under cProfile)")
    c, d = report["compressed"], report["dense"]
    print(f"  task accuracy {c['task_acc']:.4f} (dense {d['task_acc']:.4f}); strongest attack "
          f"{c['strongest']['attack']} {c['strongest']['mia_acc']:.4f} (dense "
          f"{d['strongest']['mia_acc']:.4f}); winners by rule "
          f"{Counter(r['rule'] for r in history)}")
    stats = pstats.Stats(profile).stats
    for label, suffix, name in PHASES:
        cum = sum(v[3] for (file, _, fn), v in stats.items()
                  if fn == name and file.endswith(suffix))
        print(f"  {label:32} {cum:8.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ratio", action="store_true",
                    help="only the SafeCompress/dense wall ratio of one run, with its breakdown")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--set", action="append", default=[], type=parse_setting, metavar="KEY=VALUE",
                    help="--ratio: a CompressConfig setting other than the default (repeat), "
                         "e.g. --set attack=loss --set finetune_iters=5")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.ratio:
        safecompress_vs_dense(args.dataset, dict(args.set))
        return
    masked_vs_dense("cnn", (1, 28, 28), args.steps * 3, 128)
    masked_vs_dense("vgg16", (3, 32, 32), args.steps, 32)
    attacker_epoch(5000)


if __name__ == "__main__":
    main()
