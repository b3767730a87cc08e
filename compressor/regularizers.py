"""The target's training loss: cross-entropy, optionally minus an entropy bonus (SPEC §2)."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from safeexport import names
from safeexport.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
REGULARIZERS: Registry[LossFn] = Registry("regularizer")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row's softmax."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


@REGULARIZERS.decorator("none")
def plain(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """Cross-entropy."""
    return F.cross_entropy(logits, labels)


@REGULARIZERS.decorator("re1")
def re1(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """CE − β · mean entropy over the batch."""
    return F.cross_entropy(logits, labels) - beta * entropy(logits).mean()


@REGULARIZERS.decorator("re2")
def re2(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """CE − β · mean entropy over the MISCLASSIFIED samples; the bonus is 0 when there are none
    (never NaN)."""
    wrong = logits.argmax(1) != labels
    bonus = entropy(logits[wrong]).sum() / wrong.sum().clamp(min=1)
    return F.cross_entropy(logits, labels) - beta * bonus


REGULARIZERS.check(names.REGULARIZERS)
