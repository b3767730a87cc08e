"""The final membership evaluation on signals alone (no model): the same code runs on the
PyTorch model's outputs in the compressor and on an exported file's outputs later."""

from dataclasses import dataclass, field

import numpy as np
import torch

from safeexport.attacks.base import Attack, AttackResult, Signals, is_member_of
from safeexport.metrics import RESAMPLES, fold, mia_metrics, roc_curve


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
        attack under ``threshold_attacks``, the strongest attack's name and figures, and the
        attacker-seed spread."""
        thresholds = {k: {**r.metrics, "threshold": r.threshold}
                      for k, r in self.results.items() if k != self.attack}
        name = self.strongest()
        out = {**self.metrics, "attack": self.attack, "threshold_attacks": thresholds,
               "strongest": {"attack": name, **self.results[name].metrics}}
        if self.seeds:
            out["attack_seeds"] = self.seeds
        return out


def fit_and_score(attacker: Attack, known_members: Signals, known_nonmembers: Signals,
                  eval_members: Signals, eval_nonmembers: Signals, epochs: int,
                  gen: torch.Generator, resamples: int = RESAMPLES) -> AttackResult:
    """Train ``attacker`` on the known parts, then score and measure the evaluation parts.

    The evaluation parts must be balanced (equal counts) for MIA accuracy to read against 0.5.
    """
    if len(eval_members) != len(eval_nonmembers):
        raise ValueError("the membership evaluation set must be balanced")
    attacker.fit(known_members, known_nonmembers, epochs, gen)
    scores = np.concatenate([attacker.score(eval_members), attacker.score(eval_nonmembers)])
    return AttackResult(mia_metrics(scores, is_member_of(eval_members, eval_nonmembers),
                                    resamples=resamples), scores)
