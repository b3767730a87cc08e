"""The cost of a reference-model audit (LiRA/RMIA) as a ratio of one run's training, measured in
one process on this machine.

One target run (SafeCompress, or --method) on digits is timed; then its references are built
with K = 4 and K = 16 (each K from scratch), and the scoring of LiRA and
RMIA on their outputs is timed apart. A reference trains on a half of the auxiliary data (3/16
of the pool, against the target's 1/2) for the target's number of iterations. Also printed: how
confident the target and the references are on samples they did not train on (median
logit-scaled confidence φ; references weaker than the target read lower).

Run:  .venv/bin/python benchmarks/bench_references.py [--method dense] [--ks 4 16]
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from compressor import compress
from compressor.config import CompressConfig
from compressor.references import ensure_references
from safeexport.attacks import Signals
from safeexport.attacks.reference import margins, reference_attacks, reference_outputs
from safeexport.data.splits import balanced
from safeexport.runio import inputs_of, load_data
from safeexport.runtimes import open_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="safecompress")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16])
    args = parser.parse_args()
    cfg = CompressConfig(method=args.method, epochs=args.epochs, attack="loss",
                         dense_reference=False, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run = compress(cfg, Path(tmp) / "target", progress=False)
        one = time.perf_counter() - t
        print(f"one {args.method} run on digits ({args.epochs} epochs, with its final "
              f"evaluation): {one:.1f} s")
        ds, splits = load_data(run)
        for k in args.ks:
            shutil.rmtree(run.path / "references", ignore_errors=True)  # build K from scratch
            t = time.perf_counter()
            ensure_references(run, cfg, splits, ds.y, k, compress, False)
            built = time.perf_counter() - t
            um, un = balanced(splits.unknown_members, splits.unknown_nonmembers)
            parts = [splits.known_members, splits.known_nonmembers, um, un]
            t = time.perf_counter()
            refs = reference_outputs(run, np.concatenate(parts))
            with open_runtime(run.model, "torch") as rt:
                sig = [Signals.from_logits(rt(inputs_of(ds, p)), ds.y[p]) for p in parts]
            reference_attacks(sig, parts, refs)
            scored = time.perf_counter() - t
            print(f"K = {k:3}: references built in {built:7.1f} s = {built / one:5.2f} x one "
                  f"run ({built / k / one:4.2f} per reference); outputs + LiRA + RMIA "
                  f"{scored:5.1f} s")
            print(f"         median φ out of training: target {strength(sig[1]):.2f}, "
                  f"references {strength_of_references(refs, ds.y):.2f}")


def strength(known_nonmembers: Signals) -> float:
    """The target's median logit-scaled confidence on its known non-members (the signals the
    attacks were scored on)."""
    logits = known_nonmembers.logits.numpy().astype(np.float64)
    return float(np.median(margins(logits, known_nonmembers.labels.numpy())))


def strength_of_references(refs, y: np.ndarray) -> float:
    """The references' median logit-scaled confidence on the samples each did not train on."""
    out = [margins(refs.logits[k][~refs.trained[k]], y[refs.index][~refs.trained[k]])
           for k in range(len(refs))]
    return float(np.median(np.concatenate(out)))


if __name__ == "__main__":
    main()
