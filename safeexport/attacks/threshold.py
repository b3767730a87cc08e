"""Threshold attacks on one number per sample (Yeom et al. 2018; Song & Mittal 2021): training-
free attacks beside the trained one. Each turns signals into a membership score (higher =
member); the threshold is the one that best separates the KNOWN members from non-members, and
the metrics are measured on the balanced UNKNOWN ones, like the trained attack. Every score is
computed in float64 from the logits (the loss from the logit-scaled confidence), so confident
outputs stay distinct.

``ThresholdAttack`` wraps each as an ``Attack``, so SafeCompress's in-loop safety test can use a
deterministic, training-free score (``--attack loss``) instead of the trained attacker.
"""

import copy

import numpy as np
import torch

from safeexport import names
from safeexport.attacks.base import AttackResult, Signals, is_member_of
from safeexport.metrics import RESAMPLES, mia_metrics


def _rows(s: Signals) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(len(s)), s.labels.numpy()


def loss_score(s: Signals) -> np.ndarray:
    """−cross-entropy of the true label (members have low loss): log p_y = −log(1 + e^−φ)
    from the logit-scaled confidence φ, exact even where p_y rounds to 1 in float64."""
    return -np.logaddexp(0.0, -s.margin)


def confidence_score(s: Signals) -> np.ndarray:
    """Probability of the true label."""
    return s.probs.numpy()[_rows(s)]


def entropy_score(s: Signals) -> np.ndarray:
    """−entropy of the output (members get confident outputs)."""
    lp = s.log_probs.numpy()
    return (np.exp(lp) * lp).sum(axis=1)


def modified_entropy_score(s: Signals) -> np.ndarray:
    """−Mentr (Song & Mittal): −(1−p_y)·log p_y − Σ_{i≠y} p_i·log(1−p_i), which, unlike the
    entropy, also uses the label: confidently wrong outputs score as non-members."""
    lp = s.log_probs.numpy()
    p = np.exp(lp)
    rows = _rows(s)
    # log(1 − p_i): log1p(−p) is exact wherever p is not close to 1, and only the top class can
    # be; for it, −log(1 + e^φ) from its logit-scaled confidence stays finite where p rounds to
    # 1 (a confidently WRONG output would otherwise score −inf)
    top = s.logits.argmax(dim=1)
    with np.errstate(divide="ignore"):
        log_not = np.log1p(-p)
    log_not[np.arange(len(s)), top.numpy()] = -np.logaddexp(0.0, s.margin_of(top))
    other = p * log_not
    other[rows] = 0
    return (1 - p[rows]) * lp[rows] + other.sum(axis=1)


THRESHOLD_ATTACKS = dict(zip(names.THRESHOLD_ATTACKS, (loss_score, confidence_score, entropy_score,
                                                      modified_entropy_score), strict=True))


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


class ThresholdAttack:
    """A threshold attack as an ``Attack``: ``fit`` picks the threshold on the known parts
    (``epochs`` is ignored), ``score`` is sigmoid(score − threshold), so 0.5 is the threshold."""

    trains = False

    def __init__(self, name: str, num_classes: int = 0, device: object = None) -> None:
        self.name = name
        self.function = THRESHOLD_ATTACKS[name]
        self.threshold = 0.0
        self.last_fit: dict = {}

    def fit(self, members: Signals, nonmembers: Signals, epochs: int,
            generator: torch.Generator) -> None:
        self.threshold = best_threshold(self.function(members), self.function(nonmembers))
        self.last_fit = {"threshold": self.threshold}

    def score(self, signals: Signals) -> np.ndarray:
        x = self.function(signals) - self.threshold
        return np.exp(-np.logaddexp(0.0, -x))  # sigmoid without overflow

    def clone(self) -> "ThresholdAttack":
        return copy.deepcopy(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"threshold": torch.tensor([self.threshold], dtype=torch.float64)}


def threshold_attacks(known_members: Signals, known_nonmembers: Signals,
                      eval_members: Signals, eval_nonmembers: Signals,
                      resamples: int = RESAMPLES) -> dict[str, AttackResult]:
    """Every threshold attack, its threshold fitted on the known parts, measured (with
    intervals) on the evaluation parts."""
    out = {}
    is_member = is_member_of(eval_members, eval_nonmembers)
    for name, score in THRESHOLD_ATTACKS.items():
        known = score(known_members), score(known_nonmembers)
        t = best_threshold(*known)
        scores = np.r_[score(eval_members), score(eval_nonmembers)]
        out[name] = AttackResult(mia_metrics(scores, is_member, t, resamples), scores, t, known)
    return out
