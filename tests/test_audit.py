"""``safeexport evaluate FILE --members M.npz --nonmembers N.npz``: an audit of a file
safeexport did not make (here the tiny run's ONNX export copied without its manifest, as a
user would receive it), on membership sets whose separation is known."""

import json
import shutil

import numpy as np
import pytest

from safeexport import evaluate
from safeexport.errors import ConfigError, DataError
from safeexport.runio import load_data, open_run
from tests.conftest import cli


@pytest.fixture(scope="module")
def foreign(run, tmp_path_factory):
    """The ONNX file alone, and the run's data: images with their labels, and the rest."""
    folder = tmp_path_factory.mktemp("audit")
    shutil.copy(run / "exports" / "model-onnx-w8-weight-only.onnx", folder / "model.onnx")
    ds, splits = load_data(open_run(run))
    return folder, ds, splits


def _npz(path, x, y, **extra):
    np.savez(path, x=x, y=y, **extra)
    return path


def test_an_audit_finds_the_separation_it_is_given(foreign):
    """Members keep their true labels (low loss on a model that learned them), 'non-members'
    get wrong labels (high loss): every attack must separate them well above chance, and a
    swapped or misaligned membership would read at or below 0.5."""
    folder, ds, splits = foreign
    idx = np.concatenate([splits.test, splits.unknown_nonmembers, splits.known_nonmembers])
    m, n = idx[: len(idx) // 2], idx[len(idx) // 2:]
    members = _npz(folder / "m.npz", ds.x[m], ds.y[m])
    nonmembers = _npz(folder / "n.npz", ds.x[n], (ds.y[n] + 1) % ds.num_classes)
    res = evaluate(folder / "model.onnx", members=members, nonmembers=nonmembers,
                   attack_epochs=20)
    f = res.report["figures"]
    assert f["threshold_attacks"]["loss"]["ci"]["mia_acc"][0] > 0.8
    assert f["mia_acc"] > 0.7  # the trained attacker learns it too
    assert f["strongest"]["mia_acc"] >= f["threshold_attacks"]["loss"]["mia_acc"]
    assert res.report["reference_attacks"].startswith("not run")
    assert res.json_path == folder / "model-audit-onnxruntime.json"
    assert res.plot_path.read_bytes()[:4] == b"\x89PNG"
    assert res.passed  # an audit has no verdict to fail


def test_an_audit_of_one_population_split_in_two_reads_no_leak(foreign, tmp_path):
    """'Members' and 'non-members' drawn alike from the same pool (every class, and the run's
    real members and non-members, halved between them): no attack may read far from chance
    (an attacker measured on its own training half would); one npz with a 'member' array is
    the same audit as two files."""
    folder, ds, splits = foreign
    idx = np.concatenate([splits.members, splits.validation, splits.unknown_nonmembers,
                          splits.known_nonmembers])
    trained = np.arange(len(idx)) < len(splits.members)
    flag = np.zeros(len(idx), dtype=np.int64)
    for c in range(ds.num_classes):  # alternate within each class and each origin
        for origin in (trained, ~trained):
            where = np.flatnonzero((ds.y[idx] == c) & origin)
            flag[where[::2]] = 1
    both = _npz(tmp_path / "both.npz", ds.x[idx], ds.y[idx], member=flag)
    test = _npz(tmp_path / "t.npz", ds.x[splits.test], ds.y[splits.test])
    args = ["evaluate", str(folder / "model.onnx"), "--members", str(both), "--test", str(test),
            "--attack-epochs", "5", "--json", str(tmp_path / "one.json")]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "reference attacks not run" in result.stdout
    one = json.loads((tmp_path / "one.json").read_text())
    f = one["figures"]
    for name, m in [(f["attack"], f), *f["threshold_attacks"].items()]:
        assert abs(m["mia_acc"] - 0.5) < 0.08, (name, m["mia_acc"])
    assert one["task_acc_on"] == "test" and one["samples"]["test"] == len(splits.test)
    two = evaluate(folder / "model.onnx", members=_npz(tmp_path / "m.npz", ds.x[idx[flag == 1]],
                                                        ds.y[idx[flag == 1]]),
                   nonmembers=_npz(tmp_path / "n.npz", ds.x[idx[flag == 0]],
                                   ds.y[idx[flag == 0]]),
                   test=test, attack_epochs=5, json_out=tmp_path / "two.json")
    assert two.report["figures"] == one["figures"]


def test_an_audit_with_references_cross_fits_and_ranks_every_member(foreign, run, tmp_path):
    """--model --references 2 on the tiny file, members and non-members in one npz with a
    'member' array, three members present 4 times each: two references per half are built like
    the run (its recorded training keys), the first pair on the known half only, the second on
    the measured half only (cross-fitting); LiRA and RMIA join the figures of both folds, and
    the exposure ranks EVERY member row once, named by its row in that file. (The slow sibling
    in test_references.py checks on digits that planted records rank at the top.)"""
    folder, ds, splits = foreign
    copies = np.repeat(splits.members[:3], 3)  # with the originals: 4 rows of each
    idx = np.concatenate([splits.members, copies, splits.known_nonmembers,
                          splits.unknown_nonmembers])
    flag = (np.arange(len(idx)) < len(splits.members) + len(copies)).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(idx))  # members scattered in the file
    both = _npz(tmp_path / "all.npz", ds.x[idx[order]], ds.y[idx[order]], member=flag[order])
    recorded = open_run(run).read_config()["config"]
    (tmp_path / "train.yaml").write_text("\n".join(
        f"{k}: {json.dumps(recorded[k])}" for k in ("method", "epochs", "batch_size",
                                                    "sparsity", "update_frequency",
                                                    "finetune_iters", "final_attack_epochs")))
    res = evaluate(folder / "model.onnx", members=both, model="cnn", references=2,
                   train_config=tmp_path / "train.yaml", attack="loss",
                   json_out=tmp_path / "a.json")
    r = res.report
    assert r["reference_attacks"]["settings"]["references"] == 2
    assert r["references"]["per_half"] == 2
    assert {"lira", "rmia"} <= set(r["figures"]["reference_attacks"])
    assert {"lira", "rmia"} <= set(r["reference_attacks_swapped"])
    assert r["reference_attacks_swapped"]["lira"]["auc"] != r["reference_attacks"]["lira"]["auc"]
    assert r["references"]["train_config"]["method"] == recorded["method"]
    halves = {}
    for name, trains_on in (("a-references", "known"), ("a-references-swapped", "unknown")):
        work = tmp_path / name
        index = json.loads((work / "references" / "index.json").read_text())
        assert [m["status"] for m in index["models"].values()] == ["built", "built"]
        # each reference trained on its fold's known half only: the half it scores is out of
        # both references of the fold
        split = np.load(work / "splits.npz")
        measured = np.r_[split["unknown_members"], split["unknown_nonmembers"]]
        for i in range(2):
            ref = np.load(work / "references" / f"ref-{i}" / "splits.npz")
            trained = np.r_[ref["known_members"], ref["unknown_members"]]
            assert len(trained) and not np.isin(trained, measured).any()
        halves[trains_on] = split
    # the swapped fold's halves are the first fold's, exchanged
    for part in ("members", "nonmembers"):
        assert np.array_equal(halves["known"][f"known_{part}"],
                              halves["unknown"][f"unknown_{part}"])
    # the dataset's first rows are the members file's members in file order; each input's
    # copies sit in one half
    first = set(halves["known"]["known_members"].tolist())
    member_rows = np.flatnonzero(flag[order])
    for original in splits.members[:3]:
        held = [k for k, row in enumerate(member_rows) if idx[order][row] == original]
        assert len(held) == 4 and len({k in first for k in held}) == 1
    rows = np.loadtxt(tmp_path / "a-exposure.csv", delimiter=",", skiprows=1, usecols=1)
    assert r["exposure"]["attack"] == "lira"
    # every member row of the file ranked exactly once (not only the measured, balanced half)
    assert sorted(rows.astype(int)) == member_rows.tolist()
    assert len(rows) > r["samples"]["eval_members"]


def test_audit_refusals(foreign, tmp_path):
    folder, ds, splits = foreign
    idx, oth = splits.test, splits.validation
    good = _npz(tmp_path / "g.npz", ds.x[idx], ds.y[idx])
    other = _npz(tmp_path / "o.npz", ds.x[oth], ds.y[oth])
    with pytest.raises(DataError, match="same kind of input of one shape"):
        evaluate(folder / "model.onnx", members=good,
                 nonmembers=_npz(tmp_path / "s.npz", ds.x[idx][:, :, :4, :4], ds.y[idx]))
    with pytest.raises(ConfigError, match="labels need at least 12 classes"):
        evaluate(folder / "model.onnx", members=good,
                 nonmembers=_npz(tmp_path / "k.npz", ds.x[oth], 10 + np.arange(len(oth)) % 2))
    with pytest.raises(DataError, match="too few to train an attacker"):
        evaluate(folder / "model.onnx", members=_npz(tmp_path / "f.npz", ds.x[oth[:5]],
                                                      ds.y[oth[:5]]), nonmembers=good)
    # a sample is a member or not: the same file twice, a half overlap, test data among them
    with pytest.raises(DataError, match=f"{len(idx)} of the {len(idx)} non-members are also "):
        evaluate(folder / "model.onnx", members=good, nonmembers=good)
    half = _npz(tmp_path / "h.npz", ds.x[np.r_[idx[:7], oth]], ds.y[np.r_[idx[:7], oth]])
    with pytest.raises(DataError, match="7 of the .* non-members are also among the members"):
        evaluate(folder / "model.onnx", members=good, nonmembers=half)
    with pytest.raises(DataError, match="test samples are also among the members"):
        evaluate(folder / "model.onnx", members=good, nonmembers=other, test=good)
    # the ROC plot never replaces the report (--json named like the plot), checked at once
    with pytest.raises(ConfigError, match="needs a name of its own"):
        evaluate(folder / "model.onnx", members=good, nonmembers=other,
                 json_out=tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()
    with pytest.raises(DataError, match="'member' must hold one 0 or 1"):
        evaluate(folder / "model.onnx",
                 members=_npz(tmp_path / "b.npz", ds.x[idx], ds.y[idx],
                              member=np.full(len(idx), 2)))
    with pytest.raises(ConfigError, match="drop --run"):
        evaluate(folder / "model.onnx", members=good, nonmembers=other, run=folder)
    with pytest.raises(ConfigError, match="go with --members"):
        evaluate(folder / "model.onnx", nonmembers=good)
    with pytest.raises(ConfigError, match="go with --members"):
        evaluate(folder / "model.onnx", model="cnn", references=2)
    with pytest.raises(ConfigError, match="needs --model"):
        evaluate(folder / "model.onnx", members=good, nonmembers=other, references=2)
    with pytest.raises(ConfigError, match="add --references K"):
        evaluate(folder / "model.onnx", members=good, nonmembers=other, model="cnn")
    dmp = tmp_path / "dmp.yaml"
    dmp.write_text("method: pr-dmp\n")
    with pytest.raises(ConfigError, match="pr-dmp train on non-member data"):
        evaluate(folder / "model.onnx", members=good, nonmembers=other, model="cnn",
                 references=2, train_config=dmp, json_out=tmp_path / "dmp.json")
    assert not (tmp_path / "dmp-references").exists()
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        evaluate(folder / "model.onnx", members=good, nonmembers=other, json_out=mine)
    assert mine.read_text() == "{}"


def test_copies_of_a_record_stay_in_one_half():
    """Cut by row, a record present four times had copies on both sides of the audit's
    halves: the references trained on it and LiRA ranked it 187th of 449. Cut by content,
    every copy lands with the others."""
    from device_eval.audit import _halves
    from safeexport.data.images import arrays_dataset

    rng = np.random.default_rng(0)
    unique = rng.random((80, 1, 4, 4)).astype(np.float32)
    planted = np.repeat(rng.random((10, 1, 4, 4)).astype(np.float32), 4, axis=0)
    x = np.concatenate([unique, planted])
    y = np.r_[np.arange(80) % 4, np.repeat(np.arange(10) % 4, 4)]
    first, second = _halves(arrays_dataset("t", x, y, "t"), 5, 0, "members")
    assert sorted(np.r_[first, second] - 5) == list(range(120))
    assert 60 <= len(first) <= 63  # whole records until half: at most 3 copies past it
    for record in range(10):
        rows = set(range(80 + 4 * record, 84 + 4 * record))
        assert rows <= set(first - 5) or rows <= set(second - 5), record
