"""The final membership evaluation on signals alone (no model): the same code runs on the
PyTorch model's outputs in the compressor and on an exported file's outputs later."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from safeexport import names
from safeexport.attacks.base import Attack, AttackResult, Signals, is_member_of
from safeexport.attacks.reference import fit_threshold
from safeexport.attacks.threshold import THRESHOLD_ATTACKS
from safeexport.metrics import (
    RESAMPLES,
    flagged_fpr,
    fold,
    measurable,
    mia_metrics,
    paired_difference,
    roc_curve,
)
from safeexport.rundir import atomic_write

EXPOSURE_FPR = 0.01  # the FPR at which per-class TPR is reported
EXPOSED_IN_REPORT = 20  # most exposed records a JSON report lists (its CSV has them all)


@dataclass
class MembershipResult:
    """Every attack of one evaluation on the same samples: the configured attack (``attack``,
    whose fitted ``attacker`` is kept) first, then the threshold attacks; and, with several
    attacker seeds, the spread of the configured attack over them."""

    attack: str
    attacker: Attack
    results: dict[str, AttackResult]
    is_member: np.ndarray
    seeds: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)  # what LiRA/RMIA used, when they ran
    index: np.ndarray | None = None  # dataset index of each scored sample (is_member's order)
    attackers: list[Attack] = field(default_factory=list)  # the trained attacker of each seed

    @property
    def metrics(self) -> dict:
        """The configured attack's figures."""
        return self.results[self.attack].metrics

    @property
    def scores(self) -> np.ndarray:
        return self.results[self.attack].scores

    def strongest(self) -> str:
        """The attack with the highest folded MIA accuracy (then folded AUC) here."""
        return max(self.results, key=lambda k: (fold(self.results[k].metrics["mia_acc"]),
                                                fold(self.results[k].metrics["auc"])))

    def roc(self, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr) of the configured attack, or of ``name``."""
        return roc_curve(self.results[name or self.attack].scores, self.is_member)

    def summary(self) -> dict:
        """The JSON form: the configured attack's figures at the top level, every threshold
        attack under ``threshold_attacks``, LiRA and RMIA (when they ran) with what they used
        (``settings``) under ``reference_attacks``, the strongest attack's name and figures,
        and the attacker-seed spread."""
        def figures(names) -> dict:
            return {k: {**self.results[k].metrics, "threshold": self.results[k].threshold}
                    for k in names if k != self.attack and k in self.results}

        name = self.strongest()
        out = {**self.metrics, "attack": self.attack,
               "threshold_attacks": figures(THRESHOLD_ATTACKS),
               "strongest": {"attack": name, **self.results[name].metrics}}
        if self.seeds:
            out["attack_seeds"] = self.seeds
        if self.reference:
            out["reference_attacks"] = {**figures(names.REFERENCE_ATTACKS),
                                        "settings": self.reference}
        return out

    def exposure_attack(self) -> str:
        """The attack whose scores rank records: LiRA when references ran (its score is
        calibrated per sample against models that did not train on it, which is what makes
        one record's score comparable with another's), else the strongest attack."""
        return "lira" if "lira" in self.results else self.strongest()

    def exposure(self, labels: np.ndarray, fpr: float = EXPOSURE_FPR) -> dict:
        """Per-record exposure under ``exposure_attack`` (``rank_members`` on the evaluated
        members and non-members)."""
        name = self.exposure_attack()
        scores, m = self.results[name].scores, self.is_member
        return rank_members([(scores[m], self.index[m], scores[~m])], labels, name, fpr)


def rank_members(folds: list[tuple[np.ndarray, np.ndarray, np.ndarray]], labels: np.ndarray,
                 attack: str, fpr: float = EXPOSURE_FPR) -> dict:
    """Every member of every fold (its scores, their dataset indices, the fold's non-members'
    scores under ``attack``) ranked by ``flagged_fpr`` against its own fold's non-members (the
    share of them scoring at least as high, comparable across folds; ties by score), with its
    dataset index, label and score, and each class's TPR at ``fpr`` (None when ``fpr`` is below
    1/N non-members of the smallest fold). Cross-fitted folds (an audit's two halves, each
    scored by references trained on the other) rank every member once."""
    scores = np.concatenate([f[0] for f in folds])
    idx = np.concatenate([f[1] for f in folds])
    flagged = np.concatenate([flagged_fpr(s, n) for s, _, n in folds])
    order = np.lexsort((-scores, flagged))
    records = [{"rank": r + 1, "index": int(idx[i]), "label": int(labels[idx[i]]),
                "score": float(scores[i]), "flagged_fpr": float(flagged[i])}
               for r, i in enumerate(order)]
    ok = measurable(fpr, min(len(n) for _, _, n in folds))
    per_class = {str(int(c)): {"members": int((labels[idx] == c).sum()),
                               "tpr": float((flagged[labels[idx] == c] <= fpr).mean())
                               if ok else None}
                 for c in np.unique(labels[idx])}
    return {"attack": attack, "fpr": fpr, "records": records, "per_class_tpr": per_class}


def _rank(result: AttackResult) -> tuple:
    return fold(result.metrics["mia_acc"]), fold(result.metrics["auc"])


def joint_attack(variants: list[MembershipResult], resamples: int = RESAMPLES) -> dict:
    """The multi-variant release (SPEC §9, CompLeak's multi-release setting): an attacker who
    holds several variants of one model (float and int8 files, every bit width) sees all their
    outputs for the same sample. For each attack, the joint score of a sample is the mean of its
    scores under the variants, thresholded like the single attack (refitted on the known
    parts' joint scores where the attack fits one, else the variants' mean threshold); so on
    identical variants it IS the single-file attack. Reported beside the strongest single-file
    attack, with a paired bootstrap of the difference on the same samples."""
    first = variants[0]
    if any(not np.array_equal(v.index, first.index) for v in variants[1:]):
        raise ValueError("the variants were measured on different samples")
    joint = {}
    for name in first.results:
        parts = [v.results[name] for v in variants if name in v.results]
        if len(parts) != len(variants):
            continue
        scores = np.mean([p.scores for p in parts], axis=0)
        if all(p.known is not None for p in parts):
            known = tuple(np.mean([p.known[i] for p in parts], axis=0) for i in (0, 1))
            t = fit_threshold(*known)
        else:
            known, t = None, float(np.mean([p.threshold for p in parts]))
        joint[name] = AttackResult(mia_metrics(scores, first.is_member, t, resamples), scores,
                                   t, known)
    best = max(joint, key=lambda k: _rank(joint[k]))
    k, single = max(((i, n) for i, v in enumerate(variants) for n in v.results),
                    key=lambda p: _rank(variants[p[0]].results[p[1]]))
    s = variants[k].results[single]
    diff = paired_difference(s.scores, joint[best].scores, first.is_member,
                             (s.threshold, joint[best].threshold), resamples)
    return {"joint": {n: {**r.metrics, "threshold": r.threshold} for n, r in joint.items()},
            "strongest_joint": {"attack": best, **joint[best].metrics},
            "strongest_single": {"variant": k, "attack": single, **s.metrics},
            "difference": diff,
            "joint_exceeds_single": bool(diff["mia_acc"]["ci"] is not None
                                         and diff["mia_acc"]["ci"][0] > 0)}


def exposure_for_report(exposure: dict) -> dict:
    """``exposure`` with only its ``EXPOSED_IN_REPORT`` most exposed records."""
    return {**exposure, "records": exposure["records"][:EXPOSED_IN_REPORT]}


def write_exposure_csv(path: Path, exposure: dict) -> None:
    """Every ranked record of ``exposure`` as CSV (rank, index, label, score, flagged_fpr)."""
    keys = ("rank", "index", "label", "score", "flagged_fpr")
    text = ",".join(keys) + "\n" + "".join(
        ",".join(repr(r[k]) if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n"
        for r in exposure["records"])
    atomic_write(path, lambda f: f.write(text.encode()))


def fit_and_score(attacker: Attack, known_members: Signals, known_nonmembers: Signals,
                  eval_members: Signals, eval_nonmembers: Signals, epochs: int,
                  gen: torch.Generator, resamples: int = RESAMPLES,
                  fit: bool = True) -> AttackResult:
    """Train ``attacker`` on the known parts (``fit=False``: it is fitted already, on another
    model's), then score and measure the evaluation parts.

    The evaluation parts must be balanced (equal counts) for MIA accuracy to read against 0.5.
    """
    if len(eval_members) != len(eval_nonmembers):
        raise ValueError("the membership evaluation set must be balanced")
    if fit:
        attacker.fit(known_members, known_nonmembers, epochs, gen)
    scores = np.concatenate([attacker.score(eval_members), attacker.score(eval_nonmembers)])
    return AttackResult(mia_metrics(scores, is_member_of(eval_members, eval_nonmembers),
                                    resamples=resamples), scores)
