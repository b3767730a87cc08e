"""SafeCompress's selection (compressor/safecompress.py): every candidate of a round is measured
on the same known and validation samples (paired), a TM-score lead counts only beyond the
paired standard error of the difference, a tie goes to the tie rule and never to the order of
the list, and history.jsonl records the rule that decided."""

import numpy as np
import pytest

import compressor.safecompress as sc
from compressor import compress
from compressor.config import CompressConfig
from compressor.safecompress import Measured, select_winner
from safeexport.data.splits import Splits
from safeexport.metrics import fold, tm_score
from tests.conftest import tiny_config

RULES = {"tm", "task_acc", "mia_acc", "auc", "draw"}


def _measured(task_right: np.ndarray, attack_right: np.ndarray, auc: float = 0.6) -> Measured:
    task, mia = float(task_right.mean()), float(attack_right.mean())
    is_member = np.arange(len(attack_right)) < len(attack_right) // 2
    scores = np.where(attack_right == is_member, 0.9, 0.1)  # decisions that match the outcomes
    return Measured({"task_acc": task, "mia_acc": mia, "auc": auc,
                   "tm_score": tm_score(task, mia)}, task_right, attack_right, scores, is_member)


def _outcomes(n: int, right: int, shift: int = 0) -> np.ndarray:
    """``right`` of ``n`` outcomes right; ``shift`` moves which ones (two sets that differ on
    many samples have a large paired error, nested sets a small one)."""
    return np.roll(np.r_[np.ones(right, bool), np.zeros(n - right, bool)], shift)


def test_a_lead_beyond_the_paired_error_wins_by_tm_score():
    # candidate 1 is right on 6 validation samples more, wrong on none the other gets right:
    # paired, the difference is 6 of 400 (standard error about sqrt(6)/400); unpaired, about
    # 0.021, more than the lead of 0.015
    attack = _outcomes(400, 220)  # the same attack outcomes for both
    a = _measured(_outcomes(400, 300), attack)
    b = _measured(_outcomes(400, 306), attack)
    sel = select_winner([a, b], lam=1.0, seed=0)
    assert (sel["winner"], sel["rule"], sel["leader"], sel["tied"]) == (1, "tm", 1, [1])
    assert sel["tm_se"][1] is None and 0 < sel["tm_se"][0] < 0.015 / fold(0.55)


def test_a_lead_inside_the_noise_goes_to_the_tie_rule_not_to_the_list_order():
    # candidate 0 has the higher TM-score by a hair (it leaks 3 samples less), candidate 1 the
    # higher task accuracy (2 samples more): inside one standard error, so task accuracy decides
    n = 200
    a = _measured(_outcomes(n, 160), _outcomes(n, 107))
    b = _measured(_outcomes(n, 162, 40), _outcomes(n, 110, 60))
    assert a.metrics["tm_score"] > b.metrics["tm_score"]
    for order, expected in (([a, b], 1), ([b, a], 0)):
        sel = select_winner(order, lam=1.0, seed=0)
        assert sel["rule"] == "task_acc" and sel["winner"] == expected, sel
        assert sorted(sel["tied"]) == [0, 1]


def test_equal_task_accuracy_goes_to_the_lower_attack_accuracy_then_auc():
    n = 200
    task = _outcomes(n, 150)
    a = _measured(task, _outcomes(n, 112))
    b = _measured(task, _outcomes(n, 110, 60))
    assert select_winner([a, b], 1.0, 0)["winner"] == 1
    assert select_winner([a, b], 1.0, 0)["rule"] == "mia_acc"
    c = _measured(task, _outcomes(n, 110), auc=0.58)
    d = _measured(task, _outcomes(n, 110), auc=0.55)
    sel = select_winner([c, d], 1.0, 0)
    assert (sel["winner"], sel["rule"]) == (1, "auc")


def test_identical_candidates_are_drawn_by_the_seed_not_taken_first():
    same = [_measured(_outcomes(100, 80), _outcomes(100, 55)) for _ in range(4)]
    winners = {select_winner(same, 1.0, seed)["winner"] for seed in range(20)}
    assert all(select_winner(same, 1.0, s)["rule"] == "draw" for s in range(3))
    assert len(winners) > 1  # the first candidate does not win every tie


@pytest.mark.parametrize("score", ["loss", "nasr"])
def test_every_candidate_is_tested_on_the_same_known_samples(score, tmp_path, monkeypatch):
    reads: list[np.ndarray] = []
    real = sc.predict_logits

    def spy(model, ds, idx, device, *args, **kwargs):
        reads.append(np.sort(idx))
        return real(model, ds, idx, device, *args, **kwargs)

    monkeypatch.setattr(sc, "predict_logits", spy)
    run = compress(tiny_config(score=score, dense_reference=False), tmp_path / "r")
    splits = Splits.load(run.splits)
    history = run.read_history()
    # one read per model: the round's M_S and each of its 4 candidates, all of the same samples
    assert len(reads) == 5 * len(history) > 0
    assert all(np.array_equal(r, reads[0]) for r in reads)
    read = set(reads[0].tolist())
    known = set(np.r_[splits.known_members, splits.known_nonmembers].tolist())
    assert read <= known | set(splits.validation.tolist())  # no unknown or test sample
    assert set(splits.validation.tolist()) <= read
    if score == "loss":  # a threshold attack reads every known non-member, as many members
        assert set(splits.known_nonmembers.tolist()) <= read
        assert len(read & set(splits.known_members.tolist())) == len(splits.known_nonmembers)
    for r in history:
        assert r["rule"] in RULES and r["winner"] in r["tied"]
        assert r["score"] == score
        # the winner's figures carry an interval (for the learning curve), the others none
        assert [("ci" in c) for c in r["candidates"]] == [i == r["winner"] for i in range(4)]
        m, n = r["safety_samples"]
        assert m == n
        if score == "loss":
            assert n == len(splits.known_nonmembers)
        else:  # a trained attacker is tested on the half it did not train on
            assert n < len(splits.known_nonmembers)


def test_the_in_loop_score_and_the_final_attack_are_set_apart(tmp_path):
    # the default reads a threshold attack in the loop and still trains the final attacker
    run = compress(tiny_config(dense_reference=False), tmp_path / "r")
    assert CompressConfig().score == "loss" and CompressConfig().attack == "nasr"
    assert {r["score"] for r in run.read_history()} == {"loss"}
    assert run.read_report()["compressed"]["attack"] == "nasr"
    assert all(set(r["base"]["attacker_fit"]) == {"threshold"} for r in run.read_history())


def test_a_run_recorded_before_the_score_was_split_off_read_its_attack_in_the_loop():
    recorded = {k: v for k, v in CompressConfig(attack="loss").to_dict().items() if k != "score"}
    assert CompressConfig.from_recorded(recorded).score == "loss"
    assert CompressConfig.from_recorded({**recorded, "score": "nasr"}).score == "nasr"

