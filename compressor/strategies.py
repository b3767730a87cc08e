"""Prune and grow strategies: pure functions of explicit tensors, registered by name.

A prune strategy maps (weights, masks, rate) to pruned masks for all layers at once (so a global
criterion is possible); a grow strategy maps one layer's (weight, grad, mask, n) to a mask with
exactly n more active positions. The loop grows back, per layer, exactly what was pruned there,
so the density never drifts.
"""

from collections.abc import Callable

import torch

from compressor.masking import topk_mask
from safeexport import names
from safeexport.registry import Registry

PruneFn = Callable[[list[torch.Tensor], list[torch.Tensor], float], list[torch.Tensor]]
GrowFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, int, torch.Generator],
                  torch.Tensor]

PRUNE: Registry[PruneFn] = Registry("prune strategy")
GROW: Registry[GrowFn] = Registry("grow strategy")


def prune_count(mask: torch.Tensor, rate: float) -> int:
    """How many of a layer's active weights a prune at ``rate`` removes."""
    return int(round(rate * int(mask.sum())))


def _drop_smallest(weight: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """``mask`` minus its ``n`` active positions with the smallest |weight|."""
    keep = int(mask.sum()) - n
    score = weight.detach().abs().masked_fill(~mask, -1.0)  # inactive never outrank active
    return topk_mask(score, keep)


@PRUNE.decorator("magnitude")
def prune_magnitude(weights: list[torch.Tensor], masks: list[torch.Tensor],
                    rate: float) -> list[torch.Tensor]:
    """Per layer, remove the round(rate·nnz) active weights with the smallest |w|."""
    return [_drop_smallest(w, m, prune_count(m, rate)) for w, m in zip(weights, masks,
                                                                        strict=True)]


@PRUNE.decorator("threshold")
def prune_threshold(weights: list[torch.Tensor], masks: list[torch.Tensor],
                    rate: float) -> list[torch.Tensor]:
    """Remove active weights whose |w| falls below ONE global threshold.

    The threshold is chosen so the total count equals magnitude pruning's (Σ round(rate·nnz)),
    which keeps candidates comparable; unlike magnitude pruning, the share each layer loses
    follows its weight scale (a layer of small weights loses more). Ties at the threshold are
    broken by position so the count is exact.
    """
    total = sum(prune_count(m, rate) for m in masks)
    if total == 0:
        return [m.clone() for m in masks]
    flat = torch.cat([w.detach().abs().masked_fill(~m, float("inf")).flatten().cpu()
                      for w, m in zip(weights, masks, strict=True)])
    drop = torch.zeros_like(flat, dtype=torch.bool)
    drop[torch.topk(flat, total, largest=False, sorted=False).indices] = True
    out, start = [], 0
    for m in masks:
        d = drop[start:start + m.numel()].view_as(m).to(m.device)
        out.append(m & ~d)
        start += m.numel()
    return out


def _grow_by_score(score: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    n = min(n, int((~mask).sum()))
    return mask | topk_mask(score.masked_fill(mask, -float("inf")), n)


@GROW.decorator("gradient")
def grow_gradient(weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, n: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Activate the ``n`` inactive positions with the LARGEST |dense gradient| (RigL)."""
    if grad is None:
        raise ValueError("gradient growth needs the dense gradient of the layer")
    return _grow_by_score(grad.detach().abs().float(), mask, n)


@GROW.decorator("random")
def grow_random(weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, n: int,
                generator: torch.Generator) -> torch.Tensor:
    """Activate exactly ``n`` inactive positions chosen uniformly at random."""
    score = torch.rand(mask.shape, generator=generator).to(mask.device)
    return _grow_by_score(score, mask, n)


PRUNE.check(names.PRUNE)
GROW.check(names.GROW)
