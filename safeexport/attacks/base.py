"""What every attack sees and what it must provide."""

from collections.abc import Sized
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class Signals:
    """A target model's black-box outputs on some samples: its logits, kept in float64 (a
    float32 softmax saturates to exactly 1.0 for confident outputs, which erases the very
    differences a membership attack reads), and the true labels; ``index``, the samples'
    dataset indices, where an attack needs per-sample statistics (LiRA's in-loop score)."""

    logits: torch.Tensor
    labels: torch.Tensor
    index: np.ndarray | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                    index: np.ndarray | None = None) -> "Signals":
        return cls(torch.as_tensor(logits).to(torch.float64),
                   torch.as_tensor(labels, dtype=torch.int64), index)

    @property
    def probs(self) -> torch.Tensor:
        """Softmax probabilities, float64."""
        return torch.softmax(self.logits, dim=1)

    @property
    def log_probs(self) -> torch.Tensor:
        """log-softmax, float64 (finite where the probability underflows)."""
        return torch.log_softmax(self.logits, dim=1)

    @property
    def margin(self) -> np.ndarray:
        """Logit-scaled confidence of the true label (SPEC §8); see ``margin_of``."""
        return self.margin_of(self.labels)

    def margin_of(self, classes: torch.Tensor) -> np.ndarray:
        """φ = z_c − logsumexp_{j≠c} z_j = log(p_c / (1 − p_c)) for class ``classes[i]`` of
        each sample, computed from the logits so it stays exact where p_c rounds to 1."""
        z = self.logits.clone()
        rows = torch.arange(len(z))
        zc = z[rows, classes].clone()
        z[rows, classes] = -torch.inf
        return (zc - torch.logsumexp(z, dim=1)).numpy()

    def __len__(self) -> int:
        return len(self.labels)


def is_member_of(members: Sized, nonmembers: Sized) -> np.ndarray:
    """Membership labels of the score order every attack uses: members first, then
    non-members (``members`` and ``nonmembers`` are signals or index arrays)."""
    return np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]


@dataclass
class AttackResult:
    """One attack measured on an evaluation set: its figures (``mia_metrics``), its raw scores
    (members first, as ``is_member`` orders them), the decision threshold of its accuracy and,
    for an attack whose threshold is fitted on them, its scores of the known members and
    non-members (a joint attack on several files fits its own threshold the same way)."""

    metrics: dict
    scores: np.ndarray
    threshold: float = 0.5
    known: tuple[np.ndarray, np.ndarray] | None = None


class Attack(Protocol):
    """A membership-inference attack fitted on known members and non-members."""

    last_fit: dict  # what the last ``fit`` did (epochs run, early stop, threshold), for history
    trains: bool  # fitted by training (with training noise; tested on samples it did not see)

    def fit(self, members: Signals, nonmembers: Signals, epochs: int,
            generator: torch.Generator) -> None:
        """Train (or keep training: warm start) on known members and non-members."""

    def score(self, signals: Signals) -> np.ndarray:
        """Membership score per sample in [0, 1]; above 0.5 means 'member'."""

    def clone(self) -> "Attack":
        """An independent copy (for per-candidate warm-start fine-tuning)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights, for attacker.safetensors."""
