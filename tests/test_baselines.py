"""The baselines of `safeexport compress --method`: each trains a tiny model and writes a run
directory that export and evaluate accept, on the same split and seeds as SafeCompress."""

import json

import pytest
import torch
from safetensors.torch import load_file

from compressor import compress
from compressor.masking import erk_counts, maskable
from device_eval import evaluate
from device_eval.config import EvalConfig
from exporters import export
from exporters.config import ExportConfig
from safeexport.rundir import RunDir
from tests.conftest import FAST_EXPORT, tiny_config
from tests.test_compress import _one_line_error, _rebuild, cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("baselines")
    return {m: compress(tiny_config(method=m, retrain_epochs=2), root / m).path
            for m in ("safecompress", "dense", "prune")}


def _report(run) -> dict:
    return json.loads((run / "report.json").read_text())


@pytest.mark.parametrize("method", ["dense", "prune"])
def test_each_baseline_writes_a_run_that_exports_and_evaluates(runs, method, tmp_path):
    run = runs[method]
    report = _report(run)
    assert report["method"] == method
    assert report["files"]["model.safetensors"]
    assert 0.3 < report["compressed"]["task_acc"] <= 1  # 4 balanced classes: chance 0.25
    exp = export(ExportConfig(format="onnx", bits=8, **FAST_EXPORT), run)
    res = evaluate(exp.path, EvalConfig(), json_out=tmp_path / "e.json")
    assert res.report["before"]["task_acc"] == pytest.approx(report["compressed"]["task_acc"])


def test_dense_keeps_every_weight_and_prune_keeps_the_budget(runs):
    dense, pruned = _rebuild(runs["dense"]), _rebuild(runs["prune"])
    assert _report(runs["dense"])["compressed"]["density"] == 1.0
    assert "dense" not in _report(runs["dense"])  # the method is its own reference
    weights = [p for _, p in maskable(pruned)]
    target = sum(erk_counts([tuple(w.shape) for w in weights], 0.2))
    assert sum(int((w != 0).sum()) for w in weights) <= target
    assert _report(runs["prune"])["compressed"]["nonzero_weights"] == target
    assert sum(int((p != 0).sum()) for _, p in maskable(dense)) > 4 * target


def test_prune_starts_from_the_dense_reference(runs):
    """Same seeds and split for every method: the prune baseline's dense model is the one
    SafeCompress's run trains as its reference, and the dense method trains it too."""
    ref = load_file(str(runs["safecompress"] / "dense.safetensors"))
    started_from = load_file(str(runs["prune"] / "dense.safetensors"))
    assert all(torch.equal(ref[k], started_from[k]) for k in ref)
    own = load_file(str(runs["dense"] / "model.safetensors"))
    assert all(torch.equal(ref[k], own[k]) for k in ref)
    assert _report(runs["prune"])["dense"] == _report(runs["safecompress"])["dense"] | {
        "wall_time_s": _report(runs["prune"])["dense"]["wall_time_s"]}
    for run in runs.values():
        assert (RunDir(run).splits.read_bytes() ==
                RunDir(runs["safecompress"]).splits.read_bytes())


def test_pruning_then_fine_tuning_changes_only_kept_weights(runs):
    """The pruned model's non-zeros sit where the dense model's largest weights were (per
    layer), and fine-tuning moved them."""
    dense = load_file(str(runs["prune"] / "dense.safetensors"))
    pruned = _rebuild(runs["prune"])
    for name, p in maskable(pruned):
        kept = p.detach() != 0
        k = int(kept.sum())
        top = torch.zeros(kept.numel(), dtype=torch.bool)
        top[torch.topk(dense[name].abs().flatten(), k).indices] = True
        assert int((top.view_as(kept) & kept).sum()) >= 0.99 * k, name
        assert not torch.equal(p.detach()[kept], dense[name][kept]), name


def test_unknown_method_is_one_clear_line(tmp_path):
    r = cli("compress", "--method", "magic", "--out", tmp_path / "run")
    _one_line_error(r, "unknown method 'magic'; known: safecompress, dense, prune")
    assert not (tmp_path / "run").exists()


def test_resume_retrains_an_interrupted_baseline_to_the_same_model(runs, tmp_path):
    """Baselines keep no checkpoint: --resume on an unfinished one trains it again, from the
    same seeds, to the same model."""
    run = tmp_path / "prune"
    compress(tiny_config(method="prune", retrain_epochs=2), run)
    (run / "report.json").unlink()
    compress(tiny_config(method="safecompress"), run, resume=True)  # config.json wins
    assert _report(run)["method"] == "prune"
    assert (run / "model.safetensors").read_bytes() == \
        (runs["prune"] / "model.safetensors").read_bytes()
