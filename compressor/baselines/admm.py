"""ADMM weight pruning, the formulation of Wang et al.'s MIA-Pruning (IJCAI 2021).

Pruning is the constrained problem min_W loss(W) s.t. each layer keeps at most k_l weights.
ADMM splits it: W trains on loss(W) + ρ/2·Σ‖W − Z + U‖², Z is the Euclidean projection of
W + U onto the sparse set (each layer's k_l largest magnitudes, the ERK counts SafeCompress
uses), U accumulates W − Z. Z and U are updated once per epoch. Then W is pruned to Z's
support and the sparse model retrained. No attacker is in the loop: the claim is that the
pruned subnetwork itself leaks less.
"""

import copy

import numpy as np
import torch
import torch.nn.functional as F

from compressor.baselines.students import RETRAIN_LR_SCALE, retrain_iters
from compressor.masking import erk_counts, maskable, topk_mask
from compressor.setup import Setup
from compressor.train import TrainState, iters_per_epoch, model_loss


def project(weights: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Each tensor with all but its ``count`` largest magnitudes set to zero."""
    return [w * topk_mask(w.abs(), k) for w, k in zip(weights, counts, strict=True)]


class AdmmLoss:
    """Cross-entropy plus the ADMM penalty; every ``period`` steps Z and U are updated."""

    def __init__(self, setup: Setup, model: torch.nn.Module) -> None:
        self.params = [p for _, p in maskable(model)]
        self.counts = erk_counts([tuple(p.shape) for p in self.params], setup.cfg.sparsity)
        self.rho = setup.cfg.admm_rho
        self.period = iters_per_epoch(len(setup.splits.members), setup.cfg.batch_size)
        with torch.no_grad():
            self.z = project([p.detach().clone() for p in self.params], self.counts)
            self.u = [torch.zeros_like(p) for p in self.params]
        self.ce = model_loss(model, setup.ds, setup.device, lambda lg, y, _: F.cross_entropy(lg, y))
        self.steps = self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Z ← Π(W + U); U ← U + W − Z."""
        self.z = project([p.detach() + u for p, u in zip(self.params, self.u, strict=True)],
                         self.counts)
        for p, z, u in zip(self.params, self.z, self.u, strict=True):
            u.add_(p.detach() - z)
        self.updates += 1

    def residual(self) -> float:
        """‖W − Z‖ / ‖W‖: how far the weights still are from the sparse set."""
        num = sum(float((p.detach() - z).pow(2).sum()) for p, z in zip(self.params, self.z,
                                                                       strict=True))
        den = sum(float(p.detach().pow(2).sum()) for p in self.params)
        return (num / max(den, 1e-12)) ** 0.5

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        if self.steps and self.steps % self.period == 0:
            self.update()
        self.steps += 1
        penalty = sum((p - z + u).pow(2).sum()
                      for p, z, u in zip(self.params, self.z, self.u, strict=True))
        return self.ce(idx) + self.rho / 2 * penalty

    def masks(self) -> list[torch.Tensor]:
        """The support of the final projection."""
        self.update()
        return [topk_mask(z.abs(), k) for z, k in zip(self.z, self.counts, strict=True)]


def admm_prune(setup: Setup, dense: torch.nn.Module) -> tuple[TrainState, dict]:
    """ADMM from the dense model for ``retrain_epochs``, hard pruning to the ADMM support,
    then ``retrain_epochs`` of masked retraining, both at a tenth of the training rate."""
    model = copy.deepcopy(dense)
    state = setup.new_state(model)
    iters, lr = retrain_iters(setup), setup.lr * RETRAIN_LR_SCALE
    admm = AdmmLoss(setup, model)
    setup.train(state, "admm", iters, lr, "ADMM pruning", admm)
    before = admm.residual()
    pruned = setup.new_state(model, admm.masks())
    pruned.masking.apply()
    setup.train(pruned, "admm-retrain", iters, lr, "retrain pruned")
    return pruned, {"admm": {"rho": admm.rho, "admm_iters": iters, "retrain_iters": iters,
                             "updates": admm.updates, "residual_before_prune": before}}
