"""Sparse masks: which tensors are masked, ERK allocation with exact counts, and keeping the
weights and the optimizer state consistent with the masks.

Masked: the weights of Conv and Linear layers. Dense: biases, norm layers and embeddings (the
density Ω is measured over the masked tensors, which hold almost all of a CNN's weights).
"""

import math

import torch
from torch import nn

from safeexport.models import WEIGHT_LAYERS


def maskable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every Conv/Linear layer, in module order."""
    return [(f"{name}.weight" if name else "weight", m.weight)
            for name, m in model.named_modules()
            if isinstance(m, WEIGHT_LAYERS) and m.weight is not None]


def nonzero_parameters(model: nn.Module) -> tuple[int, int]:
    """(non-zero, all) over every parameter of ``model``: biases, norms and embeddings too,
    which the masked-layer density leaves out (most of a transformer's weights)."""
    params = list(model.parameters())
    return (sum(int(torch.count_nonzero(p)) for p in params), sum(p.numel() for p in params))


def erk_counts(shapes: list[tuple[int, ...]], density: float) -> list[int]:
    """Active-weight count per tensor under Erdős–Rényi-Kernel allocation.

    Layer k gets density ε·(sum of its dims)/(product of its dims); ε is solved so the counts add
    up to exactly round(Ω·total). A layer whose density would exceed 1 is made dense and ε is
    solved again over the rest.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sizes = [math.prod(s) for s in shapes]
    target = round(density * sum(sizes))
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        free = [k for k in range(len(shapes)) if k not in dense]
        budget = target - sum(sizes[k] for k in dense)
        if not free or budget <= 0:
            break
        eps = budget / sum(raw[k] * sizes[k] for k in free)
        over = {k for k in free if eps * raw[k] >= 1}
        if not over:
            break
        dense |= over
    dens = [1.0 if k in dense else eps * raw[k] for k in range(len(shapes))]
    counts = [min(sizes[k], int(round(dens[k] * sizes[k]))) for k in range(len(shapes))]
    # Rounding leaves the total off by a few; settle it on the largest sparse layers.
    diff = target - sum(counts)
    order = sorted((k for k in range(len(shapes)) if k not in dense), key=lambda k: -sizes[k])
    i = 0
    while diff != 0 and order:
        k = order[i % len(order)]
        step = 1 if diff > 0 else -1
        if 0 < counts[k] + step <= sizes[k]:
            counts[k] += step
            diff -= step
        i += 1
    return counts


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the same shape with exactly the ``k`` highest scores set."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return mask.view_as(scores)


def init_masks(weights: list[torch.Tensor], density: float, generator: torch.Generator,
               by_magnitude: bool = False) -> list[torch.Tensor]:
    """ERK masks with exact counts: random positions (top-k of uniform scores), or the largest
    weights when ``by_magnitude`` (used when starting from pretrained weights)."""
    counts = erk_counts([tuple(w.shape) for w in weights], density)
    masks = []
    for w, k in zip(weights, counts, strict=True):
        scores = (w.detach().abs().cpu() if by_magnitude
                  else torch.rand(w.shape, generator=generator))
        masks.append(topk_mask(scores, k).to(w.device))
    return masks


class Masking:
    """Binds masks to a model's maskable weights and keeps weights and optimizer state sparse."""

    def __init__(self, model: nn.Module, masks: list[torch.Tensor]) -> None:
        pairs = maskable(model)
        self.names = [n for n, _ in pairs]
        self.params = [p for _, p in pairs]
        if len(masks) != len(self.params):
            raise ValueError(f"{len(masks)} masks for {len(self.params)} maskable tensors")
        self.masks = [m.to(device=p.device, dtype=torch.bool)
                      for m, p in zip(masks, self.params, strict=True)]

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every inactive weight (+0.0: multiplying by the mask would leave -0.0 where a
        weight was negative, so identical weights could be saved as different bytes)."""
        for p, m in zip(self.params, self.masks, strict=True):
            p.masked_fill_(~m, 0.0)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero gradients at inactive positions so momentum never builds up there. Per-sample
        gradients (Opacus's ``grad_sample``, from which DP-SGD builds the step) are masked too,
        so pruned positions take no share of each sample's clipping norm."""
        for p, m in zip(self.params, self.masks, strict=True):
            if p.grad is not None:
                p.grad.mul_(m)
            sample = getattr(p, "grad_sample", None)
            if torch.is_tensor(sample):
                sample.mul_(m)

    @torch.no_grad()
    def update(self, new_masks: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
        """Switch to ``new_masks``: newly grown weights start at zero, pruned ones become zero,
        and the optimizer state at every changed position is reset. Returns #changed."""
        changed_total = 0
        for i, (p, old, new) in enumerate(zip(self.params, self.masks, new_masks, strict=True)):
            new = new.to(device=p.device, dtype=torch.bool)
            changed = old ^ new
            changed_total += int(changed.sum())
            p.masked_fill_(changed, 0.0)
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.masked_fill_(changed, 0.0)
            self.masks[i] = new
        return changed_total

    @torch.no_grad()
    def rescale_init(self) -> None:
        """Multiply each masked tensor by 1/sqrt(its density), for a model initialised at
        random: a layer keeping a fraction d of its weights sums d of its dense fan-in, so its
        outputs' variance shrinks by d. At 4% that is 5x in standard deviation per layer, and
        through Nasr's four tanh layers the MLP's output is its biases alone, a network that
        never learns. Scaling restores the dense initialisation's variance through every layer
        (the sparse initialisation of Evci et al. 2022, "Gradient flow in sparse neural
        networks"; no maintained library applies it to an arbitrary mask, hence these lines).
        Not for pretrained weights, whose scale is already learned."""
        for p, m in zip(self.params, self.masks, strict=True):
            kept = int(m.sum())
            if kept:
                p.mul_((m.numel() / kept) ** 0.5)

    def counts(self) -> list[int]:
        """Active weights per masked tensor."""
        return [int(m.sum()) for m in self.masks]

    def density(self) -> float:
        """Active fraction over all masked tensors."""
        total = sum(m.numel() for m in self.masks)
        return sum(self.counts()) / total if total else 1.0

    def report(self) -> list[dict]:
        """Per-layer name, shape, active count and density."""
        return [{"name": n, "shape": list(m.shape), "active": c, "size": m.numel(),
                 "density": c / m.numel()}
                for n, m, c in zip(self.names, self.masks, self.counts(), strict=True)]
