"""device_eval on the host: the shared MIA path, runtimes against PyTorch, the verdict and exit
codes, bad inputs, and the three stages through the CLI. The adb runtime is tested against the
emulated arm64 phone in tests/device/."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import compress
from device_eval import evaluate
from device_eval.config import EvalConfig
from safeexport.errors import ConfigError, DataError
from safeexport.metrics import fold
from safeexport.rundir import RunDir, sha256_file, write_json
from safeexport.runio import inputs_of, load_data
from safeexport.runtimes import open_runtime
from tests.conftest import cli, cli_process, one_error_line, tiny_config


def _exp(run: Path, name: str) -> Path:
    return run / "exports" / name


# ---------------------------------------------------------------- shared path and runtimes


def test_torch_runtime_reproduces_the_compressors_figures(run, tmp_path, monkeypatch):
    """Same outputs → same figures: the compressor's final evaluation and device_eval share the
    membership code path (attacker seed, batches, threshold attacks) and, whatever this
    process's thread count, the run's recorded one (sums differ in the last digits between
    counts: on digits the attacker read 0.5022 against the report's 0.5089)."""
    import device_eval.run
    from safeexport.executors import torch_threads

    recorded = json.loads((run / "config.json").read_text())["config"]["threads"]
    device_eval.run._SIDES.clear()  # the PyTorch side is measured here, not reused
    seen, real = [], device_eval.run.measure
    monkeypatch.setattr(device_eval.run, "measure",
                        lambda *a, **kw: seen.append(torch.get_num_threads()) or real(*a, **kw))
    other = 1 if recorded > 1 else 2
    with torch_threads(other):
        res = evaluate(run / "model.safetensors", EvalConfig(runtime="torch"), run,
                       json_out=tmp_path / "e.json")
        assert torch.get_num_threads() == other
    assert seen == [recorded, recorded]
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


EXIT = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}


def test_verdict_and_exit_codes(run, tmp_path):
    two_bit = _exp(run, "model-tflite-w2-weight-only.tflite")
    r = cli("evaluate", two_bit, "--json", tmp_path / "a.json", "--max-task-drop", "0")
    report = json.loads((tmp_path / "a.json").read_text())
    v = report["verdict"]
    assert v["task_drop"] == pytest.approx(report["before"]["task_acc"]
                                           - report["after"]["task_acc"])
    assert v["outcome"] == _rule(v) and r.returncode == EXIT[v["outcome"]], r.stdout + r.stderr
    assert v["outcome"] in r.stdout
    # a tolerance no rise reaches passes
    r = cli("evaluate", two_bit, "--json", tmp_path / "b.json", "--max-task-drop", "1",
            "--max-mia-rise", "1")
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    # no tolerance: nothing can be shown safe, so never PASS; INCONCLUSIVE is exit 3, or 0
    # with --inconclusive-ok
    r = cli("evaluate", two_bit, "--json", tmp_path / "c.json", "--max-task-drop", "1",
            "--max-mia-rise", "0")
    v = json.loads((tmp_path / "c.json").read_text())["verdict"]
    assert v["outcome"] == _rule(v) != "PASS" and r.returncode == EXIT[v["outcome"]]
    if v["outcome"] == "INCONCLUSIVE":
        r = cli("evaluate", two_bit, "--json", tmp_path / "c2.json", "--max-task-drop", "1",
                "--max-mia-rise", "0", "--inconclusive-ok")
        assert r.returncode == 0 and "INCONCLUSIVE" in r.stdout and "warning" in r.stderr


def test_the_module_entry_point_gives_the_commands_verdict(run, tmp_path):
    """``python -m device_eval FILE``, a process of its own, is ``safeexport evaluate FILE``."""
    two_bit = _exp(run, "model-tflite-w2-weight-only.tflite")
    flags = ("--max-task-drop", "1", "--max-mia-rise", "1")
    m = cli_process(two_bit, "--json", tmp_path / "m.json", *flags, module="device_eval")
    assert m.returncode == 0 and "PASS" in m.stdout, m.stderr
    r = cli("evaluate", two_bit, "--json", tmp_path / "c.json", *flags)
    assert r.returncode == 0
    by_module, by_command = (json.loads((tmp_path / f).read_text())["verdict"]
                             for f in ("m.json", "c.json"))
    assert by_module == by_command


def _rule(v: dict) -> str:
    """SPEC §9's rule, read back from the report's own figures."""
    tol = v["max_mia_rise"]
    if v["task_drop"] > v["max_task_drop"] or any(
            d["ci"] and d["delta"] > tol and d["lower_all"] > 0
            for per in v["rises"]["attacks"].values() for d in per.values()):
        return "FAIL"
    if all(d["delta"] is None or (d["ci"][1] if d["ci"] else d["delta"]) < tol
           for d in v["rises"]["max"].values()):
        return "PASS"
    return "INCONCLUSIVE"


def _figures_of(side: dict, name: str) -> dict:
    if name == side["attack"]:
        return side
    return {**side["threshold_attacks"], **side.get("reference_attacks", {})}[name]


def test_verdict_logic_on_known_deltas(run, tmp_path):
    res = evaluate(_exp(run, "model-tflite-w8-static.tflite"),
                   EvalConfig(max_mia_rise=1.0, max_task_drop=1.0), json_out=tmp_path / "s.json")
    r = res.report
    assert res.passed and r["export"] == {"format": "tflite", "bits": 8, "scheme": "static"}
    assert r["delta"]["mia_acc"] == pytest.approx(r["after"]["mia_acc"] - r["before"]["mia_acc"])
    strict = EvalConfig(max_mia_rise=0.0, max_task_drop=0.0)
    res = evaluate(_exp(run, "model-tflite-w8-static.tflite"), strict,
                   json_out=tmp_path / "t.json")
    v = res.report["verdict"]
    assert v["outcome"] == _rule(v) == res.outcome and not res.passed
    # every attack is compared, and the trained ones fitted to each model as the file's
    # holder fits them, on AUC and TPR only; AUC and TPR rises are the differences of the
    # reported figures (folded AUC), and the largest rise is the largest over the attacks
    fitted_once = {r["attack"]["name"], *r["before"]["threshold_attacks"]}
    assert set(v["attacks"]) == fitted_once | {"nasr@file", "class-relative@file"}
    assert all(v["rises"]["attacks"][k]["mia_acc"]["delta"] is None
               for k in ("nasr@file", "class-relative@file"))
    for name in fitted_once:
        b, a = _figures_of(r["before"], name), _figures_of(r["after"], name)
        assert v["rises"]["attacks"][name]["auc"]["delta"] == pytest.approx(
            fold(a["auc"]) - fold(b["auc"]))
        if b["tpr_at_1pct_fpr"] is not None:
            assert v["rises"]["attacks"][name]["tpr_at_1pct_fpr"]["delta"] == pytest.approx(
                a["tpr_at_1pct_fpr"] - b["tpr_at_1pct_fpr"])
    for fig, worst in v["rises"]["max"].items():
        values = [v["rises"]["attacks"][k][fig]["delta"] for k in v["attacks"]]
        if worst["delta"] is not None:
            assert worst["delta"] == pytest.approx(max(x for x in values if x is not None))


# ---------------------------------------------------------------- bad input


def test_bad_inputs_give_one_clear_line_and_write_nothing(run, tmp_path):
    evals = tmp_path / "evals"
    onnx = _exp(run, "model-onnx-w8-weight-only.onnx")
    # not a valid model file (its manifest matches it, so the runtime is what refuses it)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    manifest = json.loads(onnx.with_suffix(".json").read_text())
    write_json(bad.with_suffix(".json"), {**manifest, "sha256": sha256_file(bad),
                                          "file": bad.name})
    one_error_line(cli("evaluate", bad, "--json", evals / "x.json"), "onnxruntime cannot load")
    # a file that differs from its manifest
    changed = tmp_path / "changed.onnx"
    changed.write_bytes(onnx.read_bytes() + b"\0")
    shutil.copy(onnx.with_suffix(".json"), changed.with_suffix(".json"))
    one_error_line(cli("evaluate", changed, "--json", evals / "x.json"),
              "does not match its manifest")
    # no manifest, and a missing file
    lone = tmp_path / "lone.onnx"
    shutil.copy(onnx, lone)
    one_error_line(cli("evaluate", lone), "has no manifest")
    one_error_line(cli("evaluate", tmp_path / "none.onnx"), "does not exist")
    # an input shape that does not match the run's data
    shaped = tmp_path / "shaped.onnx"
    shutil.copy(onnx, shaped)
    write_json(shaped.with_suffix(".json"), {**manifest, "file": shaped.name,
                                             "input": {"shape": [None, 3, 8, 8],
                                                       "dtype": "float32"}})
    one_error_line(cli("evaluate", shaped, "--json", evals / "x.json"),
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
    write_json(onnx.with_suffix(".json"), {**manifest, "file": onnx.name})
    with pytest.raises(ConfigError, match="outputs shape \\[4\\], the run has 10 classes"):
        evaluate(onnx, EvalConfig(), digits, json_out=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    # and without the edit, the model mismatch is caught first
    manifest = json.loads(_exp(run, "model-onnx-w32-weight-only.json").read_text())
    write_json(onnx.with_suffix(".json"), {**manifest, "file": onnx.name})
    with pytest.raises(ConfigError, match="exported from another model"):
        evaluate(onnx, EvalConfig(), digits)


@pytest.mark.slow  # siblings: test_api's three stages and test_compress's digits default
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
            report = json.loads((tmp_path / f"{name}.json").read_text())
            outcome = report["verdict"]["outcome"]
            assert r.returncode == EXIT[outcome] and outcome in r.stdout, r.stderr
            assert report["samples"]["eval_members"] == report["samples"]["eval_nonmembers"]
            assert report["before"]["task_acc"] > 0.5  # 10 classes: chance is 0.1


def test_a_second_file_of_a_run_reuses_its_pytorch_side_with_the_same_figures(run, tmp_path,
                                                                             monkeypatch):
    """The PyTorch model's side of an evaluation (its logits, figures, trained attacker and
    the holder attackers' fits to it) is measured once per run and settings in a process:
    the next file of the run reads the same figures a fresh process would, and other
    settings measure it again."""
    import device_eval.run

    f = _exp(run, "model-onnx-w8-weight-only.onnx")
    device_eval.run._SIDES.clear()
    measured, real = [], device_eval.run.measure
    monkeypatch.setattr(device_eval.run, "measure",
                        lambda *a, **kw: measured.append(1) or real(*a, **kw))
    first = evaluate(f, EvalConfig(), json_out=tmp_path / "a.json").report
    second = evaluate(f, EvalConfig(), json_out=tmp_path / "b.json").report
    assert len(measured) == 3  # the PyTorch model once, the file twice
    device_eval.run._SIDES.clear()
    fresh = evaluate(f, EvalConfig(), json_out=tmp_path / "c.json").report
    assert len(measured) == 5
    for r in (second, fresh):
        for key in ("before", "after", "verdict", "exposure"):
            assert r[key] == first[key], key
    evaluate(f, EvalConfig(attack_epochs=5), json_out=tmp_path / "d.json")
    assert len(measured) == 7  # other settings: the PyTorch side again
