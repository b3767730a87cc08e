"""Threshold attacks on one number per sample (Yeom et al. 2018; Song & Mittal 2021): a cheap
floor for the trained attacker. Each turns signals into a membership score (higher = member);
the threshold is the one that best separates the KNOWN members from non-members, and the
metrics are measured on the balanced UNKNOWN ones, like the trained attack."""

import numpy as np

from safeexport.attacks.base import Signals
from safeexport.metrics import mia_metrics

_TINY = 1e-30


def _true_prob(s: Signals) -> np.ndarray:
    p = s.probs.double().numpy()
    return p[np.arange(len(p)), s.labels.numpy()]


def loss_score(s: Signals) -> np.ndarray:
    """−cross-entropy of the true label (members have low loss)."""
    return np.log(np.maximum(_true_prob(s), _TINY))


def confidence_score(s: Signals) -> np.ndarray:
    """Probability of the true label."""
    return _true_prob(s)


def entropy_score(s: Signals) -> np.ndarray:
    """−entropy of the output (members get confident outputs)."""
    p = s.probs.double().numpy()
    return (p * np.log(np.maximum(p, _TINY))).sum(axis=1)


def modified_entropy_score(s: Signals) -> np.ndarray:
    """−Mentr (Song & Mittal): −(1−p_y)·log p_y − Σ_{i≠y} p_i·log(1−p_i), which, unlike the
    entropy, also uses the label: confidently wrong outputs score as non-members."""
    p = s.probs.double().numpy()
    y = s.labels.numpy()
    rows = np.arange(len(p))
    py = p[rows, y]
    other = p * np.log(np.maximum(1 - p, _TINY))
    other[rows, y] = 0
    return (1 - py) * np.log(np.maximum(py, _TINY)) + other.sum(axis=1)


THRESHOLD_ATTACKS = {"loss": loss_score, "confidence": confidence_score,
                     "entropy": entropy_score, "modified_entropy": modified_entropy_score}


def best_threshold(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """The threshold (score > t means member) with the best balanced accuracy on these sets."""
    values = np.unique(np.r_[member_scores, nonmember_scores])
    cuts = np.r_[values[0] - 1, (values[1:] + values[:-1]) / 2, values[-1] + 1] \
        if len(values) > 1 else np.r_[values[0] - 1, values[0]]
    m = np.sort(member_scores)
    n = np.sort(nonmember_scores)
    tpr = 1 - np.searchsorted(m, cuts, side="right") / len(m)
    tnr = np.searchsorted(n, cuts, side="right") / len(n)
    return float(cuts[int(np.argmax(tpr + tnr))])


def threshold_attacks(known_members: Signals, known_nonmembers: Signals,
                      eval_members: Signals, eval_nonmembers: Signals) -> dict[str, dict]:
    """Metrics of every threshold attack (threshold fitted on the known parts)."""
    out = {}
    is_member = np.r_[np.ones(len(eval_members), bool), np.zeros(len(eval_nonmembers), bool)]
    for name, score in THRESHOLD_ATTACKS.items():
        t = best_threshold(score(known_members), score(known_nonmembers))
        scores = np.r_[score(eval_members), score(eval_nonmembers)]
        out[name] = {**mia_metrics(scores, is_member, t), "threshold": t}
    return out
