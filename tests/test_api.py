"""The documented Python API (``from safeexport import ...``): the same path as the command
line, the same refusals, and each function's result type."""

import json

import pytest

from safeexport import compress, evaluate, export, replay, study
from safeexport.errors import ConfigError
from safeexport.rundir import sha256_file
from tests.conftest import FAST_EXPORT, cli, tiny_config

TINY = {k: v for k, v in tiny_config(dense_reference=False).to_dict().items()
        if k in ("dataset", "model", "sparsity", "epochs", "update_frequency", "batch_size",
                 "finetune_iters", "attack_epochs", "attack_finetune_epochs",
                 "final_attack_epochs", "max_samples", "device", "dense_reference")}


def test_compress_export_evaluate_through_the_api_match_the_command_line(tmp_path):
    run = compress(tmp_path / "api", progress=False, **TINY)
    args = ["compress", "--out", str(tmp_path / "cli"), "--no-progress", "--no-dense-reference"]
    for k, v in TINY.items():
        if k != "dense_reference":
            args += [f"--{k.replace('_', '-')}", str(v)]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    # one path: the same options give the same model, bit for bit
    assert sha256_file(run.model) == sha256_file(tmp_path / "cli" / "model.safetensors")

    exported = export(run.path, format="onnx", bits=8, **FAST_EXPORT)
    assert exported.path == run.path / "exports" / "model-onnx-w8-weight-only.onnx"
    assert json.loads(exported.manifest_path.read_text())["bits"] == 8
    report = evaluate(exported.path, json_out=tmp_path / "eval.json", attack_epochs=2)
    assert report.json_path == tmp_path / "eval.json"
    assert report.report["after"]["task_acc"] == pytest.approx(
        exported.manifest["parity"]["acc_after"], abs=1e-6)

    again = replay(run.config, tmp_path / "replayed", progress=False)
    assert sha256_file(again.model) == sha256_file(run.model)


def test_api_refusals_are_the_commands_messages(tmp_path):
    with pytest.raises(TypeError, match="spars"):
        compress(tmp_path / "x", spars=0.1)
    with pytest.raises(ConfigError, match="--sparsity is the fraction of weights kept"):
        compress(tmp_path / "x", sparsity=2.0)
    with pytest.raises(ConfigError, match="drop epochs"):
        compress(tmp_path / "x", resume=True, epochs=3)
    with pytest.raises(ConfigError, match="--bits must list widths tflite can store"):
        study(tmp_path / "s", bits=[5], **TINY)
    with pytest.raises(ConfigError, match="unknown method"):
        study(tmp_path / "s", compare=["nope"], **TINY)
    assert not (tmp_path / "x").exists()


def test_the_default_run_folder_names_the_model_auto_resolves_to(tmp_path):
    import numpy as np

    from commands.api import default_out

    np.savez(tmp_path / "table.npz", x=np.zeros((4, 3), np.float32), y=np.arange(4) % 2)
    assert default_out("digits", "auto", 0.05).name.startswith("digits-cnn-s0.05-")
    assert default_out(f"npz:{tmp_path}/table.npz", "auto", 0.1).name.startswith(
        "table.npz-mlp-s0.1-")
    assert default_out("digits", "mynets.zoo:tiny", 0.05).name.startswith(
        "digits-mynets.zoo_tiny-s0.05-")


def test_the_api_names_are_the_functions_even_after_their_modules_load(run, tmp_path):
    """`from safeexport import report` must stay the function once report() has imported its
    module (a submodule of the same name would replace the package attribute)."""
    import importlib

    import commands.api
    import safeexport

    path = safeexport.report(run, out=tmp_path / "r.html")
    assert path == tmp_path / "r.html"
    importlib.invalidate_caches()
    for name in safeexport.API:
        obj = getattr(importlib.import_module("safeexport"), name)
        assert obj is getattr(commands.api, name), name
