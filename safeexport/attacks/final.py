"""The final membership evaluation of SPEC §4-5, as one function of a model's logits.

The compressor runs it on the PyTorch model and device_eval on an exported file, with the same
seeds and tags, so the two sets of figures differ only by the outputs the models give.
"""

from collections.abc import Callable

import numpy as np
import torch

from safeexport.attacks import ATTACKS, MembershipResult, Signals, evaluate_membership
from safeexport.attacks.threshold import threshold_attacks
from safeexport.data.splits import Splits, balanced
from safeexport.seeding import derive_seed, generator, seeded


def final_membership(logits: Callable[[np.ndarray], np.ndarray], labels: np.ndarray,
                     splits: Splits, num_classes: int, attack: str, epochs: int, seed: int,
                     tag: str, device: torch.device) -> MembershipResult:
    """Train the ``attack`` on ALL known members/non-members and measure it on the BALANCED
    unknown members/non-members; the threshold attacks run on the same signals.
    ``logits(indices)`` gives the model's outputs on samples; softmax is applied on the host."""
    with seeded(derive_seed(seed, "final-attacker", tag), device):
        attacker = ATTACKS.get(attack)(num_classes, device)
    um, un = balanced(splits.unknown_members, splits.unknown_nonmembers)

    def signals(idx: np.ndarray) -> Signals:
        return Signals.from_logits(logits(idx), labels[idx])

    parts = [signals(i) for i in (splits.known_members, splits.known_nonmembers, um, un)]
    res = evaluate_membership(attacker, *parts, epochs, generator(seed, "final-attack", tag))
    res.threshold = threshold_attacks(*parts)
    return res
