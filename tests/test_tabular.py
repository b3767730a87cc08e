"""SafeCompress on a table of the kind the membership-inference literature uses (many classes,
few records per class, binary features): one that the dense MLP memorises and leaks, where the
method must keep up with pruning (docs/results/tabular.md has the full-size figures)."""

import json

import numpy as np
import pytest

from compressor import compress
from compressor.config import CompressConfig
from safeexport.data import load_dataset
from safeexport.data.tabular import make_purchase_like
from tests.conftest import RunsOnDemand, tiny_config

# a smaller table of the registered stand-in's kind, so each run takes seconds
SMALL = dict(n=1500, num_classes=30, features=200, taste=1.0)
DENSITIES = (0.05, 0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> RunsOnDemand:
    root = tmp_path_factory.mktemp("tabular")
    ds = make_purchase_like(**SMALL)
    np.savez(root / "table.npz", x=ds.x, y=ds.y)

    def make(key):
        method, density = key
        cfg = tiny_config(dataset=f"npz:{root / 'table.npz'}", model="mlp", method=method,
                          sparsity=density, max_samples=None, epochs=20, update_frequency=40,
                          retrain_epochs=5, attack="loss", dense_reference=False)
        return compress(cfg, root / f"{method}-{density}").path

    keys = [("dense", 1.0), *((m, d) for m in ("prune", "safecompress") for d in DENSITIES)]
    return RunsOnDemand(keys, make)


def _figures(path) -> dict:
    return json.loads((path / "report.json").read_text())["compressed"]


def test_the_stand_in_table_is_seeded_binary_and_many_class():
    ds = load_dataset("purchase-like")
    assert ds.x.shape == (5000, 600) and ds.num_classes == 40 and ds.kind == "tabular"
    assert set(np.unique(ds.x)) == {0.0, 1.0}
    assert np.bincount(ds.y).min() == 5000 // 40  # few records per class, every class
    assert 0.05 < ds.x.mean() < 0.2  # sparse, as purchase histories are
    assert load_dataset("purchase-like").fingerprint() == ds.fingerprint()  # the same table


def test_the_dense_mlp_memorises_the_table_and_leaks(runs):
    c = _figures(runs["dense", 1.0])
    assert c["train_acc"] >= 0.99, c["train_acc"]
    assert c["task_acc"] <= c["train_acc"] - 0.25, c["task_acc"]  # far from its members
    strongest = c["strongest"]
    assert strongest["ci"]["mia_acc"][0] >= 0.6, strongest  # leaks, beyond the noise


@pytest.mark.parametrize("density", DENSITIES)
def test_safecompress_keeps_90_percent_of_prunings_accuracy(runs, density):
    # with SGD at the paper's rate (the default for MLPs before) it kept 71% and 59%
    used = json.loads((runs["safecompress", density] / "config.json").read_text())["optimizer"]
    assert used["name"] == "adamw"  # what --optimizer auto means for an MLP
    prune = _figures(runs["prune", density])["task_acc"]
    safe = _figures(runs["safecompress", density])["task_acc"]
    assert prune > 0.25, prune  # pruning learns the table at this density (30 classes)
    assert safe >= 0.9 * prune, (safe, prune)


def test_a_run_keeps_the_optimizer_auto_resolved_to_when_it_ran():
    record = {"config": CompressConfig(model="auto").to_dict(), "model": "mlp",
              "optimizer": {"name": "sgd", "lr": 0.05}}
    old = CompressConfig.from_run_record(record)  # an MLP run from when auto meant SGD
    assert (old.optimizer, old.lr) == ("sgd", 0.05)
    now = CompressConfig.from_run_record({**record, "optimizer": {"name": "adamw", "lr": 1e-3}})
    assert (now.optimizer, now.lr) == ("auto", None)  # what auto means now: left as recorded
    cnn = CompressConfig.from_run_record({**record, "model": "cnn"})
    assert (cnn.optimizer, cnn.lr) == ("auto", None)


def test_a_study_names_the_optimizer_an_older_mlp_run_trained_with(tmp_path):
    from safeexport.errors import ConfigError
    from study.run import run_method
    from tests.conftest import write_tabular_npz

    write_tabular_npz(tmp_path / "t.npz")
    cfg = tiny_config(dataset=f"npz:{tmp_path / 't.npz'}", model="mlp", method="dense",
                      epochs=1, dense_reference=False)
    run = compress(cfg, tmp_path / "run")
    record = json.loads(run.config.read_text())
    assert record["optimizer"] == {"name": "adamw", "lr": 1e-3}  # what auto means for MLPs
    record["optimizer"] = {"name": "sgd", "lr": 0.05}  # as a run from before recorded it
    run.config.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"other settings \(lr, optimizer\); it trained with "
                                          r"--optimizer sgd --lr 0.05"):
        run_method(cfg, tmp_path / "run", False)
