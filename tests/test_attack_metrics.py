import numpy as np
import pytest
import torch

import compressor.safecompress as sc
from compressor.safecompress import Candidate, mask_update
from compressor.train import TrainState
from safeexport.attacks import ATTACKS, NasrAttack, Signals, fit_and_score
from safeexport.attacks.nasr import NasrAttackModel, features
from safeexport.metrics import accuracy, mia_metrics, roc_auc, tm_score, tpr_at_fpr
from tests.conftest import tiny_config


def test_nasr_architecture_and_a_trainable_init():
    m = NasrAttackModel(10)
    linear = [p for n, p in m.named_parameters() if n.endswith("weight")]
    # the output stream reads the C sorted log-probabilities, the loss and the confidence
    assert [tuple(p.shape) for p in linear] == [
        (1024, 12), (512, 1024), (64, 512), (512, 10), (64, 512), (256, 128), (64, 256), (1, 64)]
    # PyTorch's default (Kaiming-uniform) init, not the paper's N(0, 0.01) that freezes it:
    # the first layer's weights spread like U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    first = linear[0].detach()
    assert float(first.abs().max()) <= 1 / np.sqrt(12) and float(first.std()) > 0.1
    out = m(torch.randn(5, 12), torch.eye(10)[:5])
    assert out.shape == (5,)


def _signals(n, confidence, g, classes=10):
    y = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), y] += confidence
    return Signals.from_logits(logits, y)


def test_attacker_inputs_are_log_space_and_it_learns_a_confidence_gap():
    g = torch.Generator().manual_seed(0)
    s = _signals(4, 3.0, g)
    x = features(s)
    # sorted log-probabilities, then the loss −log p_y and the logit-scaled confidence
    assert x.dtype == torch.float64 and x.shape == (4, 12)
    assert torch.all(x[:, :10].diff(dim=1) <= 0)
    assert torch.allclose(torch.logsumexp(x[:, :10], 1), torch.zeros(4, dtype=torch.float64))
    p_y = s.probs[torch.arange(4), s.labels]
    assert torch.allclose(x[:, 10], -torch.log(p_y))
    assert torch.allclose(x[:, 11], torch.log(p_y / (1 - p_y)))
    torch.manual_seed(0)
    res = fit_and_score(NasrAttack(10), _signals(300, 6.0, g), _signals(300, 2.0, g),
                        _signals(200, 6.0, g), _signals(200, 2.0, g), 30, g)
    assert res.metrics["mia_acc"] > 0.85 and res.metrics["auc"] > 0.9
    assert res.metrics["n_members"] == res.metrics["n_nonmembers"] == 200


def test_warm_start_clone_is_independent():
    g = torch.Generator().manual_seed(1)
    a = NasrAttack(10)
    a.fit(_signals(128, 5.0, g), _signals(128, 1.0, g), 2, g)
    b = a.clone()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    b.fit(_signals(128, 5.0, g), _signals(128, 1.0, g), 2, g)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in b.state_dict().items())


def test_roc_auc_and_tpr_match_hand_computation():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    member = np.array([1, 1, 0, 1, 0, 1, 0, 0], bool)
    # pairs (member > non-member): 0.9,0.8 beat all 4; 0.6 beats 3; 0.3 beats 2 -> 13/16
    assert roc_auc(scores, member) == pytest.approx(13 / 16)
    assert tpr_at_fpr(scores, member, 0.25) == (0.75, 0.25)
    assert tpr_at_fpr(scores, member, 0.5) == (1.0, 0.5)
    # 4 non-members: 1/4 is the smallest non-zero FPR, so 1% is not measurable
    assert tpr_at_fpr(scores, member, 0.01) == (None, None)
    ties = np.array([0.5, 0.5, 0.5, 0.5])
    assert roc_auc(ties, np.array([1, 0, 1, 0], bool)) == pytest.approx(0.5)


@pytest.mark.parametrize("n_nonmembers", [150, 1200])
def test_bootstrap_statistic_equals_scikit_learns_roc(n_nonmembers):
    """The NumPy statistic behind every interval gives scikit-learn's figures, ties included
    (scores rounded to few values) and at both FPR targets."""
    from safeexport.metrics import FPR_TARGETS, _figures

    rng = np.random.default_rng(1)
    for _ in range(20):
        member = np.r_[np.ones(130, bool), np.zeros(n_nonmembers, bool)]
        scores = np.round(rng.normal(member * rng.random(), 1.0), int(rng.integers(0, 3)))
        fast = _figures(scores, member, 0.3, n_nonmembers)
        assert fast[0] == ((scores > 0.3) == member).mean()
        assert fast[1] == pytest.approx(roc_auc(scores, member), abs=1e-12)
        for k, target in enumerate(FPR_TARGETS.values()):
            want = tpr_at_fpr(scores, member, target)[0]
            assert (np.isnan(fast[2 + k]) if want is None else fast[2 + k] == want)


def test_the_bootstrap_takes_all_resamples_at_once_and_in_batches(monkeypatch):
    """The statistic on a batch of resamples (rows) is the statistic of each row, and a
    bootstrap whose resamples come in several batches (large sample sets) gives intervals of
    the same width as one batch."""
    import safeexport.metrics as metrics

    rng = np.random.default_rng(2)
    member = np.r_[np.ones(60, bool), np.zeros(140, bool)]
    rows = np.round(rng.normal(member * 0.8, 1.0, (5, 200)), 1)
    batch = metrics._figures(rows, member, 0.2, 140)
    assert batch.shape == (4, 5)
    for r in range(5):
        np.testing.assert_array_equal(batch[:, r], metrics._figures(rows[r], member, 0.2, 140))
    m = mia_metrics(rows[0], member, 0.2)
    monkeypatch.setattr(metrics, "BOOTSTRAP_CELLS", 200 * 64)  # batches of 64 resamples
    batched = mia_metrics(rows[0], member, 0.2)["ci"]
    assert batched != m["ci"]  # other draws
    for key in ("mia_acc", "auc"):
        assert batched[key][0] < m[key] < batched[key][1], key
        width = np.diff(m["ci"][key])[0]
        assert np.diff(batched[key])[0] == pytest.approx(width, rel=0.25), key


def test_mia_metrics_accuracy_at_half_and_tm_score():
    m = mia_metrics(np.array([0.9, 0.6, 0.4, 0.2]), np.array([1, 0, 1, 0], bool))
    assert m["mia_acc"] == 0.5 and m["n_members"] == 2
    assert m["tpr_at_1pct_fpr"] is None and len(m["not_measurable"]) == 2
    assert tm_score(0.9, 0.6) == pytest.approx(1.5)
    assert tm_score(0.9, 0.6, lam=2) == pytest.approx(0.81 / 0.6)
    # below chance is folded: 0.4 scores like 0.6, never better than chance
    assert tm_score(0.9, 0.4) == pytest.approx(1.5)
    assert accuracy(np.array([[0, 1], [1, 0]]), np.array([1, 1])) == 0.5


def test_selection_picks_the_highest_tm_score(monkeypatch):
    from compressor.run import compress  # noqa: F401 - make sure the module graph imports
    from safeexport.data import load_dataset
    from safeexport.data.splits import make_splits

    cfg = tiny_config()
    ds = load_dataset("synthetic", max_samples=400)
    splits = make_splits(ds.y, ds.fingerprint(), 0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    from compressor.masking import Masking, init_masks
    masking = Masking(model, init_masks([model[1].weight], 0.5, torch.Generator()))
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), masking)
    # validation samples right of 400 (the attack right on exactly half: MIA accuracy 0.5)
    right = {("magnitude", "gradient"): 220, ("magnitude", "random"): 360,
             ("threshold", "gradient"): 180, ("threshold", "random"): 240}
    made = {}

    def fake_candidate(cfg, ds, splits, base, grads, attacker, pair, *args):
        made[pair] = base.clone()
        task = np.r_[np.ones(right[pair], bool), np.zeros(400 - right[pair], bool)]
        attack = np.r_[np.ones(100, bool), np.zeros(100, bool)].repeat(2)
        is_member = np.arange(400) < 200
        return Candidate(pair[0], pair[1], made[pair], sc.Measured(
            {"task_acc": task.mean(), "mia_acc": 0.5, "auc": 0.5,
             "tm_score": task.mean() / 0.5}, task, attack,
            np.where(attack == is_member, 0.9, 0.1), is_member))

    monkeypatch.setattr(sc, "make_candidate", fake_candidate)
    winner, row = mask_update(cfg, ds, splits, state, 1, 0.3, 0.01,
                              lambda lo, y: torch.nn.functional.cross_entropy(lo, y),
                              torch.device("cpu"), lambda name: None, None)
    assert row["winner_pair"] == "magnitude+random" and row["winner"] == 1
    assert row["rule"] == "tm" and row["tied"] == [1]
    assert winner is made[("magnitude", "random")]
    assert [c["tm_score"] for c in row["candidates"]] == [r / 200 for r in right.values()]


def test_attack_registry_lists_known_names():
    with pytest.raises(Exception, match="known: nasr"):
        ATTACKS.get("whitebox")
