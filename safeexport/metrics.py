"""Pure metrics on arrays: task accuracy, membership-inference figures, TM-score.

Shared by the compressor's safety test and every later stage, so figures before and after
export come from the same code.
"""

import numpy as np


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1); higher score = member."""
    scores = np.asarray(scores, dtype=np.float64)
    is_member = np.asarray(is_member, dtype=bool)
    pos, neg = int(is_member.sum()), int((~is_member).sum())
    if pos == 0 or neg == 0:
        raise ValueError("ROC needs both members and non-members")
    order = np.argsort(-scores, kind="stable")
    s, m = scores[order], is_member[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(m)[last_of_tie]
    fp = np.cumsum(~m)[last_of_tie]
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def roc_auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half)."""
    fpr, tpr = roc_curve(scores, is_member)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(scores: np.ndarray, is_member: np.ndarray, target: float) -> tuple[float, float]:
    """(highest TPR with FPR ≤ target, the FPR actually achieved there).

    With N non-members the smallest non-zero FPR is 1/N, so at 0.1% FPR and fewer than 1,000
    non-members this is the TPR at zero false positives; the achieved FPR says so.
    """
    fpr, tpr = roc_curve(scores, is_member)
    ok = fpr <= target + 1e-12
    i = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
    return float(tpr[i]), float(fpr[i])


def mia_metrics(scores: np.ndarray, is_member: np.ndarray, threshold: float = 0.5) -> dict:
    """MIA accuracy at ``threshold`` (0.5 = chance on a balanced set), ROC AUC, TPR at 1% and
    0.1% FPR with the achieved FPRs, and the sample counts they rest on."""
    scores = np.asarray(scores, dtype=np.float64)
    is_member = np.asarray(is_member, dtype=bool)
    tpr1, fpr1 = tpr_at_fpr(scores, is_member, 0.01)
    tpr01, fpr01 = tpr_at_fpr(scores, is_member, 0.001)
    return {
        "mia_acc": float(((scores > threshold) == is_member).mean()),
        "auc": roc_auc(scores, is_member),
        "tpr_at_1pct_fpr": tpr1, "achieved_fpr_1pct": fpr1,
        "tpr_at_0.1pct_fpr": tpr01, "achieved_fpr_0.1pct": fpr01,
        "n_members": int(is_member.sum()), "n_nonmembers": int((~is_member).sum()),
    }


def tm_score(task_acc: float, mia_acc: float, lam: float = 1.0) -> float:
    """SafeCompress's trade-off: (task accuracy)^λ / (MIA accuracy); higher is better."""
    return float(task_acc ** lam / max(mia_acc, 1e-12))


def logit_parity(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict:
    """How closely an exported model's logits follow the reference model's on the same inputs:
    largest |difference|, top-1 agreement, accuracy of both, and the signal-to-noise ratio of
    the logits in dB (10·log10 of reference power over difference power; None when identical)."""
    reference, logits = np.asarray(reference, np.float64), np.asarray(logits, np.float64)
    if reference.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {logits.shape}")
    noise = float(((logits - reference) ** 2).sum())
    signal = float((reference ** 2).sum())
    return {"samples": int(len(labels)),
            "max_abs_diff": float(np.abs(logits - reference).max()),
            "max_abs_logit": float(np.abs(reference).max()),
            "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "acc_before": accuracy(reference, labels), "acc_after": accuracy(logits, labels),
            "snr_db": None if noise == 0 else 10 * float(np.log10(signal / noise))}
