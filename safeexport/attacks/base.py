"""What every attack sees and what it must provide."""

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class Signals:
    """A target model's black-box outputs on some samples: softmax probabilities (computed on
    the host from logits) and the true labels."""

    probs: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor | np.ndarray,
                    labels: torch.Tensor | np.ndarray) -> "Signals":
        logits = torch.as_tensor(logits, dtype=torch.float32)
        return cls(torch.softmax(logits, dim=1), torch.as_tensor(labels, dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.labels)


class Attack(Protocol):
    """A trainable membership-inference attack."""

    def fit(self, members: Signals, nonmembers: Signals, epochs: int,
            generator: torch.Generator) -> None:
        """Train (or keep training: warm start) on known members and non-members."""

    def score(self, signals: Signals) -> np.ndarray:
        """Membership score per sample in [0, 1]; above 0.5 means 'member'."""

    def clone(self) -> "Attack":
        """An independent copy (for per-candidate warm-start fine-tuning)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights, for attacker.safetensors."""
