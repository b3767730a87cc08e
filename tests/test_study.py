"""`safeexport study`: the pruning/quantization rows and the methods' comparison, on tiny
models and the synthetic data."""

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from safeexport.errors import ConfigError
from safeexport.executors import run_tasks
from safeexport.rundir import sha256_file
from study import compare, study
from study.run import STUDY_COLUMNS, parse_variant, row_figures
from tests.conftest import cli, one_error_line, tiny_config

TINY = dict(retrain_epochs=2)
FLAGS = ["--dataset", "synthetic", "--model", "cnn", "--sparsity", "0.2", "--epochs", "4",
         "--update-frequency", "6", "--batch-size", "32", "--finetune-iters", "2",
         "--attack-epochs", "2", "--attack-finetune-epochs", "1", "--final-attack-epochs", "2",
         "--max-samples", "400", "--device", "cpu", "--retrain-epochs", "2", "--no-progress"]


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    return out, study(tiny_config(**TINY), out, [8, 4, 3, 2], "tflite")


def test_study_table_has_every_row_measured_where_it_says(studied):
    out, res = studied
    labels = [r.label for r in res.rows]
    assert labels == ["original (dense)", "pruned, no retraining", "pruned + retrained",
                      "tflite 8-bit", "tflite 4-bit", "tflite 3-bit", "tflite 2-bit"]
    for row in res.rows:
        assert set(row.figures) >= {c.key for c in STUDY_COLUMNS}
        assert row.label in res.markdown
    seed = out / "seed-0"
    # the PyTorch rows are the runs' own reports
    for row, run in zip(res.rows[:3], ("dense", "prune-no-retrain", "prune"), strict=True):
        report = json.loads((seed / run / "report.json").read_text())
        assert row.text["Measured by"] == "PyTorch"
        assert row.text["Strongest"] == report["compressed"]["strongest"]["attack"]
        c = report["compressed"]
        assert row.text["Non-zero params"] == \
            f"{c['nonzero_parameters']:,} ({100 * c['model_density']:.1f}%)"
        expected, _ = row_figures(report["compressed"], STUDY_COLUMNS)
        assert expected["strongest_mia_acc"] == report["compressed"]["strongest"]["mia_acc"]
        for c in STUDY_COLUMNS:  # None (not measurable) is stored as NaN
            want = np.nan if expected[c.key] is None else expected[c.key]
            np.testing.assert_equal(row.figures[c.key], [want], err_msg=f"{run} {c.key}")
    pruned = json.loads((seed / "prune-no-retrain" / "report.json").read_text())
    assert pruned["two_step"]["iters"] == 0 and pruned["compressed"]["density"] < 0.25
    # the quantized rows are device_eval's figures for the exported files, in LiteRT
    for row, bits in zip(res.rows[3:], (8, 4, 3, 2), strict=True):
        ev = json.loads((seed / "prune" / "evals" /
                         f"model-tflite-w{bits}-weight-only-litert.json").read_text())
        assert ev["export"]["bits"] == bits
        assert row.text["Measured by"].startswith("litert")
        assert row.figures["mia_acc"] == [ev["after"]["mia_acc"]]
        assert row.figures["train_acc"] == [ev["after"]["train_acc"]]
        assert row.text["Non-zero params"] == res.rows[2].text["Non-zero params"]
    with open(out / "study.csv") as f:
        assert [r["row"] for r in csv.DictReader(f)] == labels
    assert "Non-zero params" in res.markdown
    assert (out / "study.png").stat().st_size > 1000
    assert (out / "study.md").read_text().count("\n|") == len(labels) + 2  # header, rule, rows


def test_study_reruns_reuse_finished_runs(studied):
    out, _ = studied
    model = out / "seed-0" / "dense" / "model.safetensors"
    before = model.stat().st_mtime_ns
    res = study(tiny_config(**TINY), out, [8], "tflite")
    assert model.stat().st_mtime_ns == before
    assert [r.label for r in res.rows][-1] == "tflite 8-bit"


def test_study_adds_a_fine_tuned_row_per_width(studied):
    """--finetune-epochs: each width is also exported after quantization-aware fine-tuning,
    measured on that file as its own row (the finished runs are reused)."""
    out, _ = studied
    res = study(tiny_config(**TINY), out, [2], "tflite", finetune_epochs=2)
    labels = [r.label for r in res.rows]
    assert labels[-2:] == ["tflite 2-bit", "tflite 2-bit + fine-tuned (2 ep)"]
    prune = out / "seed-0" / "prune"
    tuned = json.loads((prune / "exports" / "model-tflite-w2-weight-only-ft2.json").read_text())
    assert tuned["finetune"]["epochs"] == 2
    ev = json.loads((prune / "evals" / "model-tflite-w2-weight-only-ft2-litert.json")
                    .read_text())
    assert ev["sha256"] == tuned["sha256"]
    assert res.rows[-1].figures["mia_acc"] == [ev["after"]["mia_acc"]]
    assert res.rows[-1].figures["agreement"] == [ev["parity"]["agreement"]]
    assert "fine-tuning on the members" in (out / "study.md").read_text()
    r = cli("study", *FLAGS, "--compare", "prune", "--finetune-epochs", "2",
            "--out", out.parent / "c")
    one_error_line(r, "--finetune-epochs adds rows to the pruning/quantization study")


def test_the_study_grid_goes_through_the_executor(studied, monkeypatch):
    """Every run, export and evaluation of the study is a task of the executor seam, in
    three waves (dense models, pruned models, quantized rows), so --executor ray fans them
    out; the finished runs are reused."""
    from study import run as study_run

    waves = []

    def recording(tasks, executor, progress, **options):
        waves.append([t.name for t in tasks])
        return run_tasks(tasks, executor, progress, **options)

    monkeypatch.setattr(study_run, "run_tasks", recording)
    out, _ = studied
    res = study(tiny_config(**TINY), out, [8, 2], "tflite")
    assert waves == [["seed 0 dense"], ["seed 0 prune-no-retrain", "seed 0 prune"],
                     ["seed 0 tflite 8-bit", "seed 0 tflite 2-bit"]]
    assert [r.label for r in res.rows][-2:] == ["tflite 8-bit", "tflite 2-bit"]
    # a task that fails is reported after the rows that finished are written
    real = study_run.quantized_row

    def broken(run, fmt, bits, epochs):
        if bits == 2:
            raise RuntimeError("the worker died")
        return real(run, fmt, bits, epochs)

    monkeypatch.setattr(study_run, "quantized_row", broken)
    with pytest.raises(ConfigError, match="seed 0 tflite 2-bit failed: RuntimeError: the "
                                          "worker died .*the same command resumes"):
        study(tiny_config(**TINY), out, [8, 2], "tflite")
    table = (out / "study.md").read_text()
    assert "| tflite 8-bit" in table and "tflite 2-bit" not in table


def test_study_refuses_other_settings_in_the_same_folder(studied):
    out, _ = studied
    with pytest.raises(Exception, match="holds a run with other settings .*epochs"):
        study(tiny_config(**{**TINY, "epochs": 5}), out, [8], "tflite")


def test_compare_over_seeds_reports_mean_and_std_and_bolds_the_best(tmp_path):
    out = tmp_path / "c"
    r = cli("study", *FLAGS, "--compare", "dense,prune,kd,safecompress", "--seeds", "2",
            "--out", out)
    assert r.returncode == 0, r.stderr
    table = (out / "compare.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert set(rows) >= {"dense", "prune", "kd", "SafeCompress"}
    assert " ± " in rows["prune"] and "**" not in rows["dense"]  # the reference is not ranked
    assert table.count("**") >= 2 * 5  # one best per ranked column at least
    for seed in (0, 1):
        for m in ("dense", "prune", "kd", "safecompress"):
            rep = json.loads((out / f"seed-{seed}" / m / "report.json").read_text())
            assert rep["method"] == m
            cfg = json.loads((out / f"seed-{seed}" / m / "config.json").read_text())["config"]
            assert cfg["seed"] == seed
    with open(out / "compare.csv") as f:
        by_row = {row["row"]: row for row in csv.DictReader(f)}
    prune = [json.loads((out / f"seed-{s}" / "prune" / "report.json").read_text())
             ["compressed"]["task_acc"] for s in (0, 1)]
    assert float(by_row["prune"]["task_acc_mean"]) == pytest.approx(sum(prune) / 2)
    assert by_row["prune"]["task_acc_n"] == "2"
    # SafeCompress's share of rounds its score decided, from its history; none for a baseline
    shares = []
    for s in (0, 1):
        history = (out / f"seed-{s}" / "safecompress" / "history.jsonl").read_text()
        rules = [json.loads(r)["rule"] for r in history.splitlines()]
        shares.append(rules.count("tm") / len(rules))
    assert float(by_row["SafeCompress"]["tm_decided_mean"]) == pytest.approx(sum(shares) / 2)
    assert by_row["prune"]["tm_decided_n"] == "0"
    # every seed's figure with its own interval, beside the table's mean ± std
    with open(out / "compare-seeds.csv") as f:
        seeds = [r for r in csv.DictReader(f) if r["row"] == "prune" and r["figure"] == "task_acc"]
    assert [float(r["value"]) for r in seeds] == pytest.approx(prune)
    for s, r in zip((0, 1), seeds, strict=True):
        ci = json.loads((out / f"seed-{s}" / "prune" / "report.json").read_text())[
            "compressed"]["task_acc_ci"]
        assert int(r["seed"]) == s and [float(r["ci_low"]), float(r["ci_high"])] == ci
    steps = {m: float(by_row[m]["optimizer_steps_mean"]) for m in ("dense", "prune", "kd")}
    assert steps["prune"] > steps["dense"] == float(by_row["SafeCompress"]["optimizer_steps_mean"])
    # the prune baseline started from the seed's dense run and is charged its time
    rep = json.loads((out / "seed-1" / "prune" / "report.json").read_text())
    assert rep["dense_reused_from"] == str((out / "seed-1" / "dense").resolve())


def test_study_errors_are_one_clear_line(tmp_path):
    r = cli("study", *FLAGS, "--compare", "dense,magic", "--out", tmp_path / "a")
    one_error_line(r, "unknown method 'magic' in 'magic'; known: safecompress, dense")
    r = cli("study", *FLAGS, "--bits", "8,16", "--out", tmp_path / "b")
    one_error_line(r, "--bits must list widths tflite can store below float")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {"config": asdict(tiny_config()), "dataset_fingerprint": "0" * 64,
         "versions": {"safeexport": "0.1.0"}}))
    r = cli("study", *FLAGS, "--out", tmp_path / "run")
    one_error_line(r, "is a run directory")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_compare_rejects_an_empty_method_list(tmp_path):
    with pytest.raises(ConfigError, match="no method given"):
        compare(tiny_config(), tmp_path / "c", [])


def test_a_variant_row_runs_with_its_own_settings(tmp_path):
    out = tmp_path / "c"
    res = compare(tiny_config(**TINY, dense_reference=False), out,
                  ["safecompress", "safecompress/select=random/finetune-iters=3"])
    runs = {m: out / "seed-0" / m for m in ("safecompress",
                                           "safecompress.select-random.finetune-iters-3")}
    cfgs = {m: json.loads((p / "config.json").read_text())["config"] for m, p in runs.items()}
    assert (cfgs["safecompress"]["select"], cfgs["safecompress"]["finetune_iters"]) == ("tm", 2)
    variant = cfgs["safecompress.select-random.finetune-iters-3"]
    assert (variant["select"], variant["finetune_iters"], variant["method"]) == ("random", 3,
                                                                                 "safecompress")
    history = [json.loads(x) for x in (runs["safecompress.select-random.finetune-iters-3"]
                                       / "history.jsonl").read_text().splitlines()]
    assert history and all(r["rule"] == "random" for r in history)
    assert "| SafeCompress (select=random, finetune_iters=3) |" in res.markdown
    assert "| SafeCompress |" in res.markdown


def test_dense_references_are_built_once_per_seed_and_shared_by_every_row(tmp_path):
    out = tmp_path / "c"
    cfg = tiny_config(**TINY, dense_reference=False, references=2, reference_method="dense")
    res = compare(cfg, out, ["prune", "safecompress/score=lira/regularizer=re2"])
    seed = out / "seed-0"
    # the table says which references each row read: one set, named by its settings hash
    from study.run import references_used

    used = {r.label.removesuffix(" (!)"): r.text["References"] for r in res.rows}
    name = references_used(seed / "dense", seed / "dense").split()[0]
    assert used == {"prune": f"{name} (the dense run)",
                    "SafeCompress (score=lira, regularizer=re2)": f"{name} (the dense run)"}
    assert "| References |" in res.markdown
    dense = seed / "dense" / "references"
    for row in ("prune", "safecompress.score-lira.regularizer-re2"):
        index = json.loads((seed / row / "references" / "index.json").read_text())
        for i in range(2):
            # copied from the dense run (its settings key is theirs); the lira row copied them
            # before its loop, and its final audit found them in place
            status = index["models"][f"ref-{i}"]["status"]
            assert status == (f"copied from {dense / f'ref-{i}'}" if row == "prune" else "reused")
            assert sha256_file(seed / row / "references" / f"ref-{i}" / "model.safetensors") \
                == sha256_file(dense / f"ref-{i}" / "model.safetensors")
    history = (seed / "safecompress.score-lira.regularizer-re2" / "history.jsonl").read_text()
    assert all(json.loads(r)["score"] == "lira" for r in history.splitlines())


def test_a_row_with_references_of_other_settings_reads_its_own(tmp_path):
    from study.run import references_used

    def index(run: str, keys: list[str]) -> Path:
        (tmp_path / run / "references").mkdir(parents=True)
        (tmp_path / run / "references" / "index.json").write_text(json.dumps(
            {"models": {f"ref-{i}": {"settings_sha256": k} for i, k in enumerate(keys)}}))
        return tmp_path / run

    dense = index("dense", ["a1", "b2"])
    same, other = index("prune", ["a1", "b2"]), index("kd", ["c3", "d4"])
    assert references_used(same, dense).endswith("(the dense run)")
    assert references_used(other, dense).endswith("(its own)")
    assert references_used(other, dense).split()[0] != references_used(same, dense).split()[0]
    assert references_used(tmp_path / "none", dense) == "none"


@pytest.mark.parametrize("spec, message", [
    ("safecompress/seed=3", "seed is shared by every row"),
    ("safecompress/sparsity=0.5", "sparsity is shared by every row"),
    ("safecompress/select", "is not KEY=VALUE"),
    ("safecompress/finetune_iters=many", "finetune_iters must be an integer"),
    ("safecompress/bogus=1", "unknown config keys: bogus"),
    ("safecompress/select=best", "unknown select 'best'"),
    ("magic/select=random", "unknown method 'magic'"),
])
def test_a_variant_is_checked_before_anything_runs(spec, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        parse_variant(spec, tiny_config())
    r = cli("study", *FLAGS, "--compare", f"dense,{spec}", "--out", tmp_path / "c")
    one_error_line(r, message)
    assert not (tmp_path / "c").exists()


def test_study_plots_give_mia_its_own_axis_and_never_overlap_labels(tmp_path, monkeypatch):
    """study.png: accuracies on 0..1, MIA accuracy on its own zoomed axis (a 3-point risk
    change is not flattened); compare.png: one legend entry per row, no text on the axes
    (close points' labels cannot overlap); titles name the model auto resolves to."""
    import study.tables as tables
    from compressor.config import CompressConfig
    from study.run import _describe
    from study.tables import Row

    figures = []
    monkeypatch.setattr(tables, "save_figure", lambda fig, path: figures.append(fig))
    rows = []
    for label, mia in (("original", 0.56), ("pruned", 0.53), ("retrained", 0.55)):
        rows.append(Row(label))
        rows[-1].add({"train_acc": 0.99, "task_acc": 0.88, "mia_acc": mia,
                      "strongest_mia_acc": mia + 0.01},
                     {"mia_acc": [mia - 0.02, mia + 0.03]})
    tables.plot_study(tmp_path / "s.png", rows, "t")
    acc_ax, mia_ax = figures[0].axes
    assert acc_ax.get_ylim() == (0, 1.05)
    lo, hi = mia_ax.get_ylim()
    assert lo <= 0.5 and hi >= 0.59 and hi - lo < 0.15  # the intervals' ends are in view
    # both attacks, the run's with its one-seed 95% interval as error bars
    assert {t.get_text() for t in mia_ax.get_legend().get_texts()} == \
        {"the run's attack", "strongest attack", "chance"}
    errors = tables._errors(rows, "mia_acc")
    np.testing.assert_allclose(errors, [[0.02] * 3, [0.03] * 3])
    tables.plot_tradeoff(tmp_path / "c.png", rows, "t")
    ax = figures[1].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [r.label for r in rows]
    assert not ax.texts
    assert _describe(CompressConfig(dataset="digits"), [0]).startswith("cnn on digits")
