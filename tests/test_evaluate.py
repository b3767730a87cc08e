"""device_eval on the host: the shared MIA path, runtimes against PyTorch, the verdict and exit
codes, bad inputs, and the three stages through the CLI. The adb runtime is tested against the
emulated arm64 phone in tests/device/."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor import compress
from device_eval import evaluate
from device_eval.config import EvalConfig
from safeexport.errors import ConfigError, DataError
from safeexport.rundir import RunDir, sha256_file, write_json
from safeexport.runio import inputs_of, load_data
from safeexport.runtimes import open_runtime
from tests.conftest import tiny_config
from tests.test_compress import HANG_GUARD_S, cli
from tests.test_export import _one_line


def _exp(run: Path, name: str) -> Path:
    return run / "exports" / name


# ---------------------------------------------------------------- shared path and runtimes


def test_torch_runtime_reproduces_the_compressors_figures(run, tmp_path):
    """Same outputs → same figures: the compressor's final evaluation and device_eval share the
    membership code path (attacker seed, batches, threshold attacks)."""
    res = evaluate(run / "model.safetensors", EvalConfig(runtime="torch"), run,
                   json_out=tmp_path / "e.json")
    reported = json.loads((run / "report.json").read_text())["compressed"]
    for key in ("task_acc", "mia_acc", "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr",
                "tm_score", "threshold_attacks"):
        assert res.report["after"][key] == reported[key], key
        assert res.report["before"][key] == reported[key], key
    assert set(reported["threshold_attacks"]) == {"loss", "confidence", "entropy",
                                                  "modified_entropy"}


@pytest.mark.parametrize("name", ["model-onnx-w32-weight-only.onnx",
                                  "model-tflite-w32-weight-only.tflite"])
def test_float_exports_give_pytorch_logits(run, name, tmp_path):
    ds, splits = load_data(RunDir(run))
    x = inputs_of(ds, splits.test)
    with open_runtime(_exp(run, name)) as rt, open_runtime(run / "model.safetensors") as ref:
        assert rt.name in ("onnxruntime", "litert") and ref.name == "torch"
        assert np.abs(rt(x) - ref(x)).max() < 1e-4
    res = evaluate(_exp(run, name), EvalConfig(), json_out=tmp_path / "f.json")
    assert res.report["parity"]["agreement"] == 1.0
    assert res.report["parity"]["max_abs_diff"] < 1e-4
    assert res.report["sha256"] == sha256_file(_exp(run, name))
    assert res.plot_path.exists() and res.json_path.exists()


def test_verdict_and_exit_codes(run, tmp_path):
    two_bit = _exp(run, "model-tflite-w2-weight-only.tflite")
    r = cli("evaluate", two_bit, "--json", tmp_path / "a.json", "--max-task-drop", "0")
    report = json.loads((tmp_path / "a.json").read_text())
    drop = report["verdict"]["task_drop"]
    assert drop == pytest.approx(report["before"]["task_acc"] - report["after"]["task_acc"])
    assert r.returncode == (1 if drop > 0 or _privacy_fails(report["verdict"], 0.01) else 0)
    r = cli("evaluate", two_bit, "--json", tmp_path / "b.json", "--max-task-drop", "1",
            "--max-mia-rise", "1")
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    r = cli("evaluate", two_bit, "--json", tmp_path / "c.json", "--max-task-drop", "1",
            "--max-mia-rise", "0")
    verdict = json.loads((tmp_path / "c.json").read_text())["verdict"]
    assert r.returncode == (1 if _privacy_fails(verdict, 0.0) else 0)
    # the same command through the module entry point
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    m = subprocess.run([sys.executable, "-m", "device_eval", str(two_bit), "--json",
                        str(tmp_path / "d.json"), "--max-task-drop", "1", "--max-mia-rise",
                        "1"], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert m.returncode == 0 and "PASS" in m.stdout, m.stderr


def _privacy_fails(verdict: dict, tolerance: float) -> bool:
    """The rule: a rise above the tolerance whose paired interval excludes zero."""
    return verdict["mia_rise"] > tolerance and verdict["paired"]["mia_acc"]["ci"][0] > 0


def test_verdict_logic_on_known_deltas(run, tmp_path):
    res = evaluate(_exp(run, "model-tflite-w8-static.tflite"),
                   EvalConfig(max_mia_rise=1.0, max_task_drop=1.0), json_out=tmp_path / "s.json")
    r = res.report
    assert res.passed and r["export"] == {"format": "tflite", "bits": 8, "scheme": "static"}
    assert r["delta"]["mia_acc"] == pytest.approx(r["after"]["mia_acc"] - r["before"]["mia_acc"])
    strict = EvalConfig(max_mia_rise=0.0, max_task_drop=0.0)
    res = evaluate(_exp(run, "model-tflite-w8-static.tflite"), strict,
                   json_out=tmp_path / "t.json")
    v = r["verdict"]
    # the verdict's attack is the strongest on the PyTorch model, and its paired delta is
    # the difference of that attack's figures on the two models
    strongest = r["before"]["strongest"]
    assert v["attack"] == strongest["attack"]
    after = (r["after"] if v["attack"] == r["attack"]["name"]
             else r["after"]["threshold_attacks"][v["attack"]])
    assert v["mia_rise"] == pytest.approx(after["mia_acc"] - strongest["mia_acc"])
    expected = not _privacy_fails(v, 0.0) and v["task_drop"] <= 0
    assert res.passed == expected
    assert len(res.report["verdict"]["reasons"]) == _privacy_fails(v, 0.0) + (
        v["task_drop"] > 0)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_give_one_clear_line_and_write_nothing(run, tmp_path):
    evals = tmp_path / "evals"
    onnx = _exp(run, "model-onnx-w8-weight-only.onnx")
    # not a valid model file (its manifest matches it, so the runtime is what refuses it)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    manifest = json.loads(onnx.with_suffix(".json").read_text())
    write_json(bad.with_suffix(".json"), {**manifest, "sha256": sha256_file(bad)})
    _one_line(cli("evaluate", bad, "--json", evals / "x.json"), "onnxruntime cannot load")
    # a file that differs from its manifest
    changed = tmp_path / "changed.onnx"
    changed.write_bytes(onnx.read_bytes() + b"\0")
    shutil.copy(onnx.with_suffix(".json"), changed.with_suffix(".json"))
    _one_line(cli("evaluate", changed, "--json", evals / "x.json"),
              "does not match its manifest")
    # no manifest, and a missing file
    lone = tmp_path / "lone.onnx"
    shutil.copy(onnx, lone)
    _one_line(cli("evaluate", lone), "has no manifest")
    _one_line(cli("evaluate", tmp_path / "none.onnx"), "does not exist")
    # an input shape that does not match the run's data
    shaped = tmp_path / "shaped.onnx"
    shutil.copy(onnx, shaped)
    write_json(shaped.with_suffix(".json"), {**manifest, "input": {"shape": [None, 3, 8, 8],
                                                                   "dtype": "float32"}})
    _one_line(cli("evaluate", shaped, "--json", evals / "x.json"),
              "takes float32 inputs of shape \\[3, 8, 8\\]")
    assert not evals.exists()


def test_data_and_class_mismatches(run, tmp_path):
    # a run whose data changed after the split
    npz = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x=rng.integers(0, 255, (400, 1, 8, 8), dtype=np.uint8), y=np.arange(400) % 4)
    other = compress(tiny_config(dataset=f"npz:{npz}", max_samples=None, epochs=1,
                                 update_frequency=5, dense_reference=False),
                     tmp_path / "other").path
    np.savez(npz, x=rng.integers(0, 255, (400, 1, 8, 8), dtype=np.uint8), y=np.arange(400) % 4)
    with pytest.raises(DataError, match="differs from the data"):
        evaluate(other / "model.safetensors", EvalConfig(), other)
    # a 4-class export evaluated against a 10-class run (digits, same 8x8 inputs), its manifest
    # edited to claim that run's model
    digits = compress(tiny_config(dataset="digits", max_samples=None, epochs=1,
                                  dense_reference=False), tmp_path / "digits").path
    onnx = tmp_path / "four.onnx"
    shutil.copy(_exp(run, "model-onnx-w32-weight-only.onnx"), onnx)
    manifest = json.loads(_exp(run, "model-onnx-w32-weight-only.json").read_text())
    manifest["source"]["model_sha256"] = sha256_file(digits / "model.safetensors")
    write_json(onnx.with_suffix(".json"), manifest)
    with pytest.raises(ConfigError, match="outputs shape \\[4\\], the run has 10 classes"):
        evaluate(onnx, EvalConfig(), digits, json_out=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    # and without the edit, the model mismatch is caught first
    shutil.copy(_exp(run, "model-onnx-w32-weight-only.json"), onnx.with_suffix(".json"))
    with pytest.raises(ConfigError, match="exported from another model"):
        evaluate(onnx, EvalConfig(), digits)


def test_cli_compress_export_evaluate_on_the_digits_default(tmp_path):
    """The three stages through the command line on the embedded default dataset."""
    out = tmp_path / "run"
    r = cli("compress", "--out", out, "--epochs", "6", "--update-frequency", "20",
            "--attack-epochs", "10", "--attack-finetune-epochs", "2", "--final-attack-epochs",
            "20", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for fmt in ("onnx", "tflite"):
        for bits in ("8", "4"):
            r = cli("export", "--run", out, "--format", fmt, "--bits", bits, "--min-agreement",
                    "0.5", "--parity-samples", "128")
            assert r.returncode == 0, r.stderr
            name = f"model-{fmt}-w{bits}-weight-only"
            model = out / "exports" / f"{name}.{fmt}"
            r = cli("evaluate", model, "--json", tmp_path / f"{name}.json")
            assert r.returncode in (0, 1), r.stderr
            report = json.loads((tmp_path / f"{name}.json").read_text())
            assert ("PASS" in r.stdout) == report["verdict"]["passed"] == (r.returncode == 0)
            assert report["samples"]["eval_members"] == report["samples"]["eval_nonmembers"]
            assert report["before"]["task_acc"] > 0.5  # 10 classes: chance is 0.1
