"""The cost of ``safeexport evaluate`` on one exported file, measured in one process on this
machine: the whole evaluation, the share of it the file holder's attackers take (the trained
attackers fitted to each model, ``held_by_file``), and the evaluation as a ratio of the run's
own training time, so machines of different speed compare.

One run (default: the README's, SafeCompress on digits, trained here) is exported as float32
ONNX into a scratch folder and evaluated against it.

Run:  .venv/bin/python benchmarks/bench_evaluate.py [--run RUN_DIR]
"""

import safeexport  # noqa: F401 - first: OpenMP's wait policy before torch loads (openmp.py)

# isort: split
import argparse
import json
import tempfile
import time
from pathlib import Path

import device_eval.run
from compressor import compress
from compressor.config import CompressConfig
from device_eval import evaluate
from device_eval.config import EvalConfig
from exporters import export
from exporters.config import ExportConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run (default: train the README's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or compress(CompressConfig(dense_reference=False, device="cpu"),
                                   Path(tmp) / "run", progress=False).path
        trained = json.loads((run / "report.json").read_text())["compressed"]["wall_time_s"]
        exported = export(ExportConfig(format="onnx", bits=32), run, out=Path(tmp) / "m.onnx")
        held, real = [], device_eval.run.held_by_file

        def timed(*a, **kw):
            t = time.perf_counter()
            out = real(*a, **kw)
            held.append(time.perf_counter() - t)
            return out

        device_eval.run.held_by_file = timed
        t = time.perf_counter()
        res = evaluate(exported.path, EvalConfig(), json_out=Path(tmp) / "e.json")
        whole = time.perf_counter() - t
    print(f"evaluate {exported.path.name} ({res.outcome}): {whole:.1f} s, of which the file "
          f"holder's attackers {held[0]:.1f} s ({100 * held[0] / whole:.0f}%); "
          f"{whole / trained:.2f} x the run's training ({trained:.1f} s)")


if __name__ == "__main__":
    main()
