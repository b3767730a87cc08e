"""The cost of ``safeexport evaluate``, measured in one process on this machine: one exported
file as a ratio of the run's own training time (so machines of different speed compare), then
a second file of the same run, which reuses the PyTorch model's side of the evaluation (its
figures, trained attacker and the file holder's fits to it: ``PyTorchSide``).

One run (default: the README's, SafeCompress on digits, trained here) is exported as float32
and 8-bit ONNX into a scratch folder and each is evaluated against it.

Run:  .venv/bin/python benchmarks/bench_evaluate.py [--run RUN_DIR]
"""

import safeexport  # noqa: F401 - first: OpenMP's wait policy before torch loads (openmp.py)

# isort: split
import argparse
import json
import tempfile
import time
from pathlib import Path

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
        times, outcomes = [], []
        for bits in (32, 8):  # a second file of the same run reuses its PyTorch side
            exported = export(ExportConfig(format="onnx", bits=bits), run,
                              out=Path(tmp) / f"m{bits}.onnx")
            t = time.perf_counter()
            res = evaluate(exported.path, EvalConfig(), json_out=Path(tmp) / f"e{bits}.json")
            times.append(time.perf_counter() - t)
            outcomes.append(res.outcome)
    print(f"evaluate the float32 ONNX file ({outcomes[0]}): {times[0]:.1f} s = "
          f"{times[0] / trained:.2f} x the run's training ({trained:.1f} s); then the 8-bit "
          f"file of the same run ({outcomes[1]}), its PyTorch side reused: {times[1]:.1f} s "
          f"({100 * times[1] / times[0]:.0f}%)")

if __name__ == "__main__":
    main()
