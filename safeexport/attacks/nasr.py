"""The black-box NN attacker of Nasr et al. (2018), as SPEC §2 fixes it, made to learn.

Inputs are the target's softmax probabilities (unsorted, in class order, as Nasr et al. feed
them; with the one-hot label beside them the attacker can read the true-class probability) and
the one-hot true label. Batches are balanced: 64 members and 64 non-members per step of 128.

What differs from the paper, and why: the paper's N(0, 0.01) initialisation gives first-layer
gradients of ~1e-9 through six layers, below Adam's eps, and the network never leaves a constant
output at our sample sizes (measured: 0.5000 ± 5e-7 on every sample). PyTorch's default
(Kaiming-uniform) initialisation trains. An epoch covers the LARGER side once (the smaller side
is cycled), and training stops early on a held-out fifth of the known data: the weights with the
lowest held-out loss are kept, and a warm-started fine-tune keeps its starting weights unless
fine-tuning lowers that loss.
"""

import copy

import numpy as np
import torch
from torch import nn

from safeexport.attacks.base import Signals

HOLDOUT = 0.2  # share of each known side held out for early stopping
# Training stops after this many epochs, and at least this many steps, without a better
# held-out loss (on small sets an epoch is a handful of steps and the held-out loss is noisy).
PATIENCE = 10
PATIENCE_STEPS = 500
MIN_HOLDOUT = 5  # fewer held-out samples per side than this: no early stopping


class NasrAttackModel(nn.Module):
    """Probability stream C→1024→512→64, label stream C→512→64, fusion 128→256→64→1."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.probs = nn.Sequential(nn.Linear(num_classes, 1024), nn.ReLU(),
                                   nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 64), nn.ReLU())
        self.labels = nn.Sequential(nn.Linear(num_classes, 512), nn.ReLU(),
                                    nn.Linear(512, 64), nn.ReLU())
        self.fusion = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(),
                                    nn.Linear(64, 1))

    def forward(self, probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Logit of membership (sigmoid gives the probability)."""
        return self.fusion(torch.cat([self.probs(probs), self.labels(onehot)], dim=1)).squeeze(1)


class NasrAttack:
    """Trains and applies ``NasrAttackModel`` on cached signals (targets are never re-run)."""

    batch_size = 128

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.model = NasrAttackModel(num_classes).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.last_fit: dict = {}
        self.trained = False  # a warm start may keep its starting weights; a fresh one may not

    def _inputs(self, s: Signals) -> tuple[torch.Tensor, torch.Tensor]:
        onehot = nn.functional.one_hot(s.labels, self.num_classes).float()
        return s.probs.float().to(self.device), onehot.to(self.device)

    @torch.no_grad()
    def _holdout_loss(self, x: torch.Tensor, o: torch.Tensor, target: torch.Tensor,
                      weight: torch.Tensor) -> float:
        self.model.eval()
        loss = nn.functional.binary_cross_entropy_with_logits(self.model(x, o), target,
                                                              weight=weight, reduction="sum")
        return float(loss)

    def fit(self, members: Signals, nonmembers: Signals, epochs: int,
            generator: torch.Generator) -> None:
        """At most ``epochs`` epochs, each batch half members, half non-members; early stopping
        on a held-out fifth of each side (class-balanced loss), keeping the best weights."""
        pm, om = self._inputs(members)
        pn, on = self._inputs(nonmembers)
        perm_m = torch.randperm(len(members), generator=generator).to(self.device)
        perm_n = torch.randperm(len(nonmembers), generator=generator).to(self.device)
        hm, hn = int(len(members) * HOLDOUT), int(len(nonmembers) * HOLDOUT)
        stop_early = min(hm, hn) >= MIN_HOLDOUT
        if not stop_early:
            hm = hn = 0
        tm, tn = perm_m[hm:], perm_n[hn:]
        if stop_early:
            vm, vn = perm_m[:hm], perm_n[:hn]
            vx, vo = torch.cat([pm[vm], pn[vn]]), torch.cat([om[vm], on[vn]])
            vt = torch.cat([torch.ones(hm), torch.zeros(hn)]).to(self.device)
            vw = torch.cat([torch.full((hm,), 0.5 / hm), torch.full((hn,), 0.5 / hn)]).to(
                self.device)
            best = self._holdout_loss(vx, vo, vt, vw) if self.trained else float("inf")
            best_state = copy.deepcopy(self.model.state_dict())
        half = self.batch_size // 2
        steps = max(1, -(-max(len(tm), len(tn)) // half))
        patience = max(PATIENCE, -(-PATIENCE_STEPS // steps))
        target = torch.cat([torch.ones(half), torch.zeros(half)]).to(self.device)
        loss_fn = nn.BCEWithLogitsLoss()
        best_epoch, since, done = 0, 0, 0
        for epoch in range(1, epochs + 1):
            self.model.train()
            # each side in a fresh random order, cycled to fill ``steps`` balanced batches
            order_m = torch.randperm(len(tm), generator=generator).to(self.device)
            order_n = torch.randperm(len(tn), generator=generator).to(self.device)
            pos = torch.arange(steps * half, device=self.device)
            bm_all, bn_all = tm[order_m[pos % len(tm)]], tn[order_n[pos % len(tn)]]
            for s in range(steps):
                bm, bn = bm_all[s * half:(s + 1) * half], bn_all[s * half:(s + 1) * half]
                out = self.model(torch.cat([pm[bm], pn[bn]]), torch.cat([om[bm], on[bn]]))
                loss = loss_fn(out, target)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            done = epoch
            if not stop_early:
                continue
            current = self._holdout_loss(vx, vo, vt, vw)
            if current < best:
                best, best_state, best_epoch, since = current, copy.deepcopy(
                    self.model.state_dict()), epoch, 0
            else:
                since += 1
                if since >= patience:
                    break
        if stop_early:
            self.model.load_state_dict(best_state)
        self.trained = True
        self.last_fit = {"epochs_run": done, "best_epoch": best_epoch if stop_early else done,
                         "holdout_loss": best if stop_early else None,
                         "early_stopping": stop_early}

    @torch.no_grad()
    def score(self, signals: Signals) -> np.ndarray:
        """Membership probability per sample."""
        self.model.eval()
        p, o = self._inputs(signals)
        return torch.sigmoid(self.model(p, o).double()).cpu().numpy()

    def clone(self) -> "NasrAttack":
        """Deep copy, optimizer state included (warm start keeps Adam's moments)."""
        return copy.deepcopy(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()
