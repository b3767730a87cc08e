import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from compressor import compress
from compressor.config import CompressConfig
from compressor.masking import erk_counts, maskable
from safeexport.errors import ConfigError
from safeexport.executors import torch_threads
from safeexport.metrics import fold
from safeexport.models import build_from_spec, build_model
from tests.conftest import (
    HANG_GUARD_S,
    REPO,
    cli,
    cli_process,
    one_error_line,
    tiny_config,
    write_agnews_csv,
    write_tabular_npz,
)

TINY_FLAGS = ["--dataset", "synthetic", "--max-samples", "400", "--sparsity", "0.2",
              "--batch-size", "32", "--finetune-iters", "2", "--attack-epochs", "2",
              "--attack-finetune-epochs", "1", "--final-attack-epochs", "2", "--device", "cpu"]


def _rebuild(run: Path) -> torch.nn.Module:
    model = build_from_spec(json.loads((run / "model.json").read_text()))
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    return model


def test_cli_end_to_end_on_the_digits_default(tmp_path):
    out = tmp_path / "run"
    r = cli("compress", "--epochs", "5", "--update-frequency", "12", "--finetune-iters", "2",
            "--attack-epochs", "2", "--final-attack-epochs", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "keeping 5.0% of weights" in r.stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "splits.npz", "model.safetensors", "model.json",
            "attacker.safetensors", "history.jsonl", "report.json", "curve.png", "roc.png",
            "dense.safetensors"} <= names
    assert "checkpoint" not in names  # removed once the run is complete
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["dataset"] == "digits" and cfg["model"] == "cnn"
    assert len(cfg["dataset_fingerprint"]) == 64 and cfg["versions"]["torch"].startswith("2.13")
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2  # 5 epochs x 7 iterations = 35: updates at 12 and 24
    for row in history:
        pairs = {(c["prune"], c["grow"]) for c in row["candidates"]}
        assert pairs == {("magnitude", "gradient"), ("magnitude", "random"),
                         ("threshold", "gradient"), ("threshold", "random")}
        tms = [c["tm_score"] for c in row["candidates"]]
        assert row["leader"] == int(np.argmax(tms)) and row["winner"] in row["tied"]
        assert row["rule"] in {"tm", "task_acc", "mia_acc", "auc", "draw"}
        assert (row["winner"] == row["leader"]) if row["rule"] == "tm" else len(row["tied"]) > 1
        for c in row["candidates"]:
            assert c["tm_score"] == pytest.approx(c["task_acc"] / fold(c["mia_acc"]))
            assert {"auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"} <= set(c)
        win = row["candidates"][row["winner"]]  # the winner's interval, for the curve
        lo, hi = win["ci"]["mia_acc"]
        assert lo <= win["mia_acc"] <= hi
    report = json.loads((out / "report.json").read_text())
    for key in ("compressed", "dense"):
        m = report[key]
        assert m["task_acc"] > 0.3  # 10 classes: a misaligned label reads about 0.1
        lo, hi = m["ci"]["mia_acc"]
        assert lo <= m["mia_acc"] <= hi and lo < hi
        assert m["n_members"] == m["n_nonmembers"] > 0
        # the TM-score reads the strongest attack measured, never a collapsed one
        assert m["tm_attack"] == m["strongest"]["attack"]
        assert m["tm_score"] == pytest.approx(m["task_acc"] / fold(m["strongest"]["mia_acc"]))
        assert m["strongest"]["mia_acc"] == max(
            [m["mia_acc"], *(a["mia_acc"] for a in m["threshold_attacks"].values())],
            key=fold)
    assert report["compressed"]["task_acc"] > 0.2  # chance is 0.1; 35 steps at 5% density
    # pruned entries are exactly zero: at most Ω of the masked weights are non-zero
    model = _rebuild(out)
    weights = [p for _, p in maskable(model)]
    target = sum(erk_counts([tuple(w.shape) for w in weights], 0.05))
    nonzero = sum(int((w != 0).sum()) for w in weights)
    assert 0.9 * target <= nonzero <= target
    assert report["compressed"]["nonzero_weights"] == target
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_density_is_exact_after_every_update(tmp_path):
    cfg = tiny_config()
    seen = []

    def check(rnd):
        t = load_file(str(tmp_path / "r" / "checkpoint" / "state.safetensors"))
        masks = [t[k] for k in sorted((k for k in t if k.startswith("mask.")),
                                      key=lambda k: int(k.split(".")[1]))]
        seen.append([int(m.sum()) for m in masks])

    compress(cfg, tmp_path / "r", on_round=check)
    history = [json.loads(x) for x in (tmp_path / "r" / "history.jsonl").read_text().split("\n")
               if x]
    assert len(seen) == len(history) >= 3
    assert all(counts == seen[0] for counts in seen)
    spec = json.loads((tmp_path / "r" / "model.json").read_text())
    model = build_model(spec["name"], spec["kwargs"])
    assert seen[0] == erk_counts([tuple(p.shape) for _, p in maskable(model)], 0.2)
    assert all(c["changed"] > 0 for row in history for c in row["candidates"])


def _tensors(path: Path) -> dict:
    return load_file(str(path))


def test_resume_after_kill_gives_the_uninterrupted_result(tmp_path):
    # augmented, so the augmentation's random crops and flips are resumed exactly too
    flags = [*TINY_FLAGS, "--epochs", "8", "--update-frequency", "4", "--augment", "crop-flip"]
    ref = tmp_path / "ref"  # uninterrupted, in this process (the same thread count: --threads)
    assert cli("compress", *flags, "--out", ref).returncode == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "safeexport", "compress", *flags, "--out",
                             str(killed)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint" / "state.safetensors"
    deadline = time.time() + HANG_GUARD_S
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "report.json").exists(), "the run finished before it could be killed"
    rounds_before = len((killed / "history.jsonl").read_text().splitlines())
    assert 1 <= rounds_before < 11
    r = cli_process("compress", "--out", killed, "--resume")
    assert r.returncode == 0, r.stderr
    a, b = _tensors(ref / "model.safetensors"), _tensors(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((ref / "report.json").read_text())
    rb = json.loads((killed / "report.json").read_text())
    for part in ("compressed", "dense"):
        ra[part].pop("wall_time_s")
        rb[part].pop("wall_time_s")
    ra.pop("final_eval_time_s")
    rb.pop("final_eval_time_s")
    for r in (ra, rb):  # config.json records when each run was created
        r["files"].pop("config.json")
    assert ra == rb
    assert (ref / "history.jsonl").read_text() == (killed / "history.jsonl").read_text()
    # a finished run has nothing left to resume
    again = cli("compress", "--out", killed, "--resume")
    assert again.returncode == 0 and "already complete" in again.stdout


@pytest.mark.parametrize("args,pattern", [
    (["--sparsity", "0"], r"must be in \(0, 1\]"),
    (["--sparsity", "1.5"], r"must be in \(0, 1\]"),
    (["--model", "lenet"], "unknown model 'lenet'; known: auto, cnn, mlp"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'; known: digits, synthetic"),
    (["--dataset", "fashionmnist", "--data-dir", "{tmp}/empty"],
     r"train-images-idx3-ubyte.* not found: expected .*--download"),
    (["--dataset", "npz:{tmp}/small.npz"], "too few for the membership split"),
    (["--dataset", "digits", "--model", "bert"], "takes text data but digits is image"),
])
def test_bad_inputs_give_one_clear_line(tmp_path, args, pattern):
    np.savez(tmp_path / "small.npz", x=np.zeros((60, 8, 8), np.uint8), y=np.arange(60) % 3)
    (tmp_path / "empty").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = cli("compress", *args, "--out", tmp_path / "run")
    one_error_line(r, pattern)
    assert not (tmp_path / "run").exists()


def test_existing_run_is_refused_and_kept(tmp_path):
    out = tmp_path / "run"
    compress(tiny_config(epochs=1, update_frequency=5, dense_reference=False), out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    one_error_line(cli("compress", *TINY_FLAGS, "--out", out),
                    "already holds a run.*--resume.*--overwrite")
    # --overwrite with an input that fails validation destroys nothing either
    one_error_line(cli("compress", *TINY_FLAGS, "--max-samples", "50", "--overwrite",
                        "--out", out), "too few")
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = cli("compress", *TINY_FLAGS, "--epochs", "1", "--update-frequency", "5", "--seed", "5",
            "--no-dense-reference", "--overwrite", "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 5
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    one_error_line(cli("compress", *TINY_FLAGS, "--overwrite", "--out", other),
                    "not a run directory")
    assert (other / "keep.txt").read_text() == "mine"


def test_corrupt_checkpoint_and_resume_flag_misuse(tmp_path):
    out = tmp_path / "run"

    def stop(rnd):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(tiny_config(), out, on_round=stop)
    ckpt = out / "checkpoint" / "state.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    one_error_line(cli("compress", "--out", out, "--resume"), "checkpoint.*damaged|corrupt")
    assert ckpt.exists()
    r = cli("compress", "--out", out, "--resume", "--epochs", "3")
    assert r.returncode == 2 and "drop epochs (--epochs)" in r.stderr
    one_error_line(cli("compress", "--out", tmp_path / "none", "--resume"), "no run to resume")


def test_resume_refuses_different_data(tmp_path):
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 255, (300, 8, 8), dtype=np.uint8), y=np.arange(300) % 3)
    out = tmp_path / "run"

    def stop(rnd):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(tiny_config(dataset=f"npz:{data}", max_samples=None), out, on_round=stop)
    np.savez(data, x=rng.integers(0, 255, (300, 8, 8), dtype=np.uint8), y=np.arange(300) % 3)
    one_error_line(cli("compress", "--out", out, "--resume"), "differs from the data")


def test_config_json_round_trip_and_all_problems_at_once():
    cfg = tiny_config(regularizer="re2", prune=["magnitude"], lam=2.0)
    assert CompressConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError) as e:
        CompressConfig(sparsity=0, epochs=0, regularizer="re3", grow=["sideways"])
    msg = str(e.value)
    for part in ("--sparsity", "epochs must be", "regularizer 're3'", "grow 'sideways'"):
        assert part in msg
    with pytest.raises(ConfigError, match="unknown config keys: sparsityy"):
        CompressConfig.from_dict({"sparsityy": 0.1})


def test_text_model_on_a_csv(tmp_path):
    write_agnews_csv(tmp_path)
    cfg = tiny_config(dataset="agnews", model="bert", data_dir=str(tmp_path), max_samples=None,
                      max_length=12, vocab_size=120, epochs=6, update_frequency=12,
                      dense_reference=False)
    run = compress(cfg, tmp_path / "run")
    assert (run.path / "tokenizer.json").exists()
    report = json.loads(run.report.read_text())
    assert report["compressed"]["task_acc"] > 0.6
    assert any(layer["name"].endswith("query.weight") for layer in report["layers"])
    # the embeddings stay dense: the whole-model density, reported beside the masked layers',
    # counts what the saved model holds, and is far above the budget
    c = report["compressed"]
    params = list(_rebuild(run.path).parameters())
    assert c["nonzero_parameters"] == sum(int(torch.count_nonzero(p)) for p in params)
    assert c["parameters"] == sum(p.numel() for p in params)
    assert c["model_density"] > c["density"] + 0.02


def test_tabular_with_the_mlp_and_regularizer(tmp_path):
    write_tabular_npz(tmp_path / "t.npz")
    cfg = tiny_config(dataset=f"npz:{tmp_path / 't.npz'}", model="auto", regularizer="re2",
                      dense_reference=False)
    run = compress(cfg, tmp_path / "run")
    assert json.loads(run.config.read_text())["model"] == "mlp"


def test_run_replays_a_recorded_config_and_a_yaml_of_the_same_keys(tmp_path):
    from safeexport.rundir import sha256_file

    first = compress(tiny_config(epochs=2, update_frequency=5, dense_reference=False),
                     tmp_path / "first").path
    r = cli("run", first / "config.json", "--out", tmp_path / "again", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert sha256_file(tmp_path / "again" / "model.safetensors") == \
        sha256_file(first / "model.safetensors")
    # the same keys by hand, in YAML: only what differs from the defaults
    own = {k: v for k, v in tiny_config(epochs=2, update_frequency=5,
                                        dense_reference=False).to_dict().items()
           if v != getattr(CompressConfig(), k)}
    import yaml

    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(own))
    r = cli("run", tmp_path / "mine.yaml", "--out", tmp_path / "yaml", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert sha256_file(tmp_path / "yaml" / "model.safetensors") == \
        sha256_file(first / "model.safetensors")
    # replaying into the run it came from is refused like compress would refuse it
    one_error_line(cli("run", first / "config.json", "--out", first), "already holds a run")


@pytest.mark.parametrize("text,pattern", [
    ("epoch: 3\n", "mine.yaml: unknown config keys: epoch"),
    ("epochs: ten\n", "epochs must be an integer, got 'ten'"),
    ("sparsity: 1.5\n", r"--sparsity is the fraction of weights kept and must be in \(0, 1\]"),
    ("prune: magnitude\n", "prune must be a list of strings"),
    ("!!python/object/apply:os.system ['true']\n", "cannot read it as a yaml config"),
    ("- 1\n- 2\n", "a config must be a mapping"),
])
def test_run_refuses_a_bad_config_file_in_one_line(tmp_path, text, pattern):
    (tmp_path / "mine.yaml").write_text(text)
    r = cli("run", tmp_path / "mine.yaml", "--out", tmp_path / "run")
    one_error_line(r, pattern)
    assert not (tmp_path / "run").exists()


def test_multistep_schedule_divides_the_rate_at_half_and_three_quarters(tmp_path):
    from compressor.train import iters_per_epoch, learning_rate
    from safeexport.data.splits import Splits

    rates = [learning_rate("multistep", 0.1, i, 100) for i in (0, 49, 50, 74, 75, 99)]
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert learning_rate("cosine", 0.1, 50, 100) == pytest.approx(0.05)
    cfg = tiny_config(lr_schedule="multistep", lr=0.1, dense_reference=False)
    run = compress(cfg, tmp_path / "run")
    members = len(Splits.load(run.path / "splits.npz").members)
    total = cfg.epochs * iters_per_epoch(members, cfg.batch_size)
    rows = run.read_history()
    # each round's candidates were fine-tuned at the rate of its iteration: all three levels
    assert [r["lr"] for r in rows] == pytest.approx(
        [learning_rate("multistep", 0.1, r["iteration"], total) for r in rows])
    assert {round(r["lr"], 6) for r in rows} == {0.1, 0.01, 0.001}


def test_augmented_training_is_recorded_and_changes_only_training(tmp_path):
    plain = compress(tiny_config(augment="none", dense_reference=False), tmp_path / "plain")
    aug = compress(tiny_config(augment="crop-flip", dense_reference=False), tmp_path / "aug")
    assert json.loads(aug.config.read_text())["augment"] == "crop-flip"
    # 400 samples: 200 members, 6 batches of 32 an epoch, 4 epochs
    assert json.loads(aug.report.read_text())["training"] == {
        "augment": "crop-flip", "attacks_and_evaluation_read": "un-augmented inputs",
        "members": 200, "iterations": 24}
    assert json.loads(plain.report.read_text())["training"]["augment"] == "none"
    # the same split and seeds: only the augmented batches differ
    assert plain.splits.read_bytes() == aug.splits.read_bytes()
    assert plain.model.read_bytes() != aug.model.read_bytes()


def test_threads_option_sets_torch_threads_for_the_run_only(tmp_path):
    before = torch.get_num_threads()
    n = 2 if before == 1 else 1  # a count other than the current one
    seen = []
    compress(tiny_config(threads=n, dense_reference=False), tmp_path / "run",
             on_round=lambda r: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {n}
    assert torch.get_num_threads() == before
    r = cli("compress", "--threads", "0", "--out", tmp_path / "bad")
    assert r.returncode != 0 and "threads must be >= 1" in r.stderr


def test_a_run_from_before_augment_resumes_without_it(tmp_path, monkeypatch):
    # auto augments the synthetic images here, as it does CIFAR's
    monkeypatch.setattr("safeexport.data.augment.NATURAL_IMAGES", ("synthetic",))

    class Stop(Exception):
        pass

    def stop(_round):
        raise Stop

    for name, old in (("old", True), ("new", False)):
        with pytest.raises(Stop):
            compress(tiny_config(dense_reference=False), tmp_path / name, on_round=stop)
        config = json.loads((tmp_path / name / "config.json").read_text())
        if old:  # what config.json held before the option existed
            del config["config"]["augment"]
            (tmp_path / name / "config.json").write_text(json.dumps(config))
        # a replay of its config.json means the same
        assert CompressConfig.from_file(tmp_path / name / "config.json").augment == \
            ("none" if old else "auto"), name
        run = compress(tiny_config(dense_reference=False), tmp_path / name, resume=True)
        augment = json.loads(run.report.read_text())["training"]["augment"]
        assert augment == ("none" if old else "crop-flip"), name


def test_a_run_records_its_thread_count_and_resume_and_replay_reuse_it(tmp_path):
    """Same seed, same run holds at one thread count: a run records the count it ran on
    (torch's own when --threads is not given), a resumed run and a replay run on it whatever
    the process is set to."""
    cfg = tiny_config(epochs=3, update_frequency=4, dense_reference=False)
    with torch_threads(2):  # the process's count is not 1 (the test processes run on 1)
        default = compress(replace(cfg, epochs=1, update_frequency=3), tmp_path / "default")
    assert default.read_config()["config"]["threads"] == 2

    class Stop(Exception):
        pass

    def stop(r):
        raise Stop

    with pytest.raises(Stop):
        compress(replace(cfg, threads=1), tmp_path / "one", on_round=stop)
    seen = []
    compress(CompressConfig(), tmp_path / "one", resume=True,
             on_round=lambda r: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {1}
    whole = compress(replace(cfg, threads=1), tmp_path / "whole")
    r = cli("run", whole.config, "--out", tmp_path / "again", "--no-progress")
    assert r.returncode == 0, r.stderr
    for a, b in ((whole.model, tmp_path / "one" / "model.safetensors"),
                 (whole.model, tmp_path / "again" / "model.safetensors")):
        ta, tb = _tensors(a), _tensors(b)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
