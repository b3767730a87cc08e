"""The final membership evaluation on signals alone (no model): the same code runs on the
PyTorch model's outputs in the compressor and on an exported file's outputs later."""

from dataclasses import dataclass, field

import numpy as np
import torch

from safeexport.attacks.base import Attack, Signals
from safeexport.metrics import mia_metrics, roc_curve


@dataclass
class MembershipResult:
    """Metrics, per-sample scores and ROC of one attack evaluation, and the trained attacker;
    ``threshold`` holds the threshold attacks' metrics on the same signals when computed."""

    metrics: dict
    scores: np.ndarray
    is_member: np.ndarray
    attacker: Attack
    threshold: dict = field(default_factory=dict)

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr)."""
        return roc_curve(self.scores, self.is_member)


def evaluate_membership(attacker: Attack, known_members: Signals, known_nonmembers: Signals,
                        eval_members: Signals, eval_nonmembers: Signals, epochs: int,
                        gen: torch.Generator) -> MembershipResult:
    """Train ``attacker`` on the known parts, then score the evaluation parts.

    The evaluation parts must be balanced (equal counts) for MIA accuracy to read against 0.5.
    """
    if len(eval_members) != len(eval_nonmembers):
        raise ValueError("the membership evaluation set must be balanced")
    attacker.fit(known_members, known_nonmembers, epochs, gen)
    scores = np.concatenate([attacker.score(eval_members), attacker.score(eval_nonmembers)])
    is_member = np.r_[np.ones(len(eval_members), bool), np.zeros(len(eval_nonmembers), bool)]
    return MembershipResult(mia_metrics(scores, is_member), scores, is_member, attacker)
