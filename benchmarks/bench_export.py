"""Export sizes and latencies, as ratios measured in one run on this machine.

For one finished run (default: the newest under runs/), every format × bit width (weight-only)
is exported into a scratch folder and measured:
- file bytes and gzip bytes as a ratio of the fp32 PyTorch weights (4 bytes per parameter), and
  as a ratio of the information-theoretic floor for the run's sparsity and that bit width;
- the time its runtime takes to load it (best of 3), and its latency at batch 1 and batch 256,
  relative to PyTorch eager on the same inputs and threads (a TFLite file has a fixed batch, so
  batch 256 is a second file);
- both with sparse storage (the default) and dense (``--no-sparse-storage``), except the float
  TFLite files (always dense).

Run:  .venv/bin/python benchmarks/bench_export.py [--run RUN_DIR] [--repeats N]
"""

import safeexport  # noqa: F401 - first: OpenMP's wait policy before torch loads (openmp.py)

# isort: split
import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from exporters import export
from exporters.config import SUPPORTED, ExportConfig
from exporters.run import Source
from safeexport.console import quiet
from safeexport.runtimes import open_runtime


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    base = ExportConfig(parity_samples=256, min_agreement=0.0)
    src = Source.load(args.run, base.parity_samples, base.calibration)
    threads = torch.get_num_threads()
    x1 = src.inputs[:1]
    x256 = np.repeat(src.inputs, -(-256 // len(src.inputs)), axis=0)[:256]
    with torch.no_grad():
        eager1 = _best(lambda: src.model(torch.from_numpy(x1)), args.repeats)
        eager256 = _best(lambda: src.model(torch.from_numpy(x256)), max(3, args.repeats // 5))
    fp32 = 4 * sum(src.params.values())
    print(f"run {src.run.path}: {sum(src.params.values()):,} parameters, fp32 weights "
          f"{fp32:,} bytes; torch {torch.__version__}, {threads} threads")
    print(f"PyTorch eager: batch 1 {1e3 * eager1:.3f} ms, batch 256 {1e3 * eager256:.2f} ms")
    print(f"{'export':37}{'bytes':>10}{'/fp32':>7}{'gzip/fp32':>10}{'/floor':>8}"
          f"{'gzip/floor':>11}{'load ms':>9}{'b1 ms':>8}{'/eager':>8}{'b256 ms':>9}"
          f"{'/eager':>8}{'agree':>7}")
    variants = [(fmt, bits, sparse) for (fmt, scheme), bits_list in SUPPORTED.items()
                if scheme == "weight-only" for bits in bits_list
                for sparse in ((True, False) if bits <= 8 or fmt == "onnx" else (False,))]
    with tempfile.TemporaryDirectory() as d:
        for fmt, bits, sparse in variants:
            cfg = replace(base, format=fmt, bits=bits, sparse_storage=sparse)
            label = cfg.name() + ("-sparse" if sparse else "")
            suffix = f".{fmt}"
            res = export(cfg, out=Path(d) / f"{label}{suffix}", source=src)
            s = res.manifest["sizes"]
            with quiet():
                load = _best(lambda p=res.path: open_runtime(p, threads=threads), 3)
                rt1 = open_runtime(res.path, threads=threads)
                if fmt == "tflite":  # fixed batch: a second file at batch 256
                    big = export(replace(cfg, batch_size=256),
                                 out=Path(d) / f"{label}-b256{suffix}", source=src)
                    rt256 = open_runtime(big.path, threads=threads)
                else:
                    rt256 = rt1
                t1 = _best(lambda rt=rt1: rt(x1), args.repeats)
                t256 = _best(lambda rt=rt256: rt(x256, chunk=256), max(3, args.repeats // 5))
            print(f"{label:37}{s['bytes']:10,}{s['bytes'] / fp32:7.3f}"
                  f"{s['gzip_bytes'] / fp32:10.3f}{s['bytes'] / s['floor_bytes']:8.2f}"
                  f"{s['gzip_bytes'] / s['floor_bytes']:11.2f}{1e3 * load:9.1f}"
                  f"{1e3 * t1:8.3f}{t1 / eager1:8.2f}{1e3 * t256:9.2f}{t256 / eager256:8.2f}"
                  f"{res.manifest['parity']['agreement']:7.3f}")

if __name__ == "__main__":
    main()
