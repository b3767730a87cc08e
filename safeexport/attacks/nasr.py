"""The black-box NN attacker of Nasr et al. (2018), as SPEC §2 fixes it.

Inputs are the target's softmax probabilities (unsorted, in class order, as Nasr et al. feed
them; with the one-hot label beside them the attacker can read the true-class probability) and
the one-hot true label. Batches are balanced: 64 members and 64 non-members per step of 128.
"""

import copy

import numpy as np
import torch
from torch import nn

from safeexport.attacks.base import Signals


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
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

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

    def _inputs(self, s: Signals) -> tuple[torch.Tensor, torch.Tensor]:
        onehot = nn.functional.one_hot(s.labels, self.num_classes).float()
        return s.probs.to(self.device), onehot.to(self.device)

    def fit(self, members: Signals, nonmembers: Signals, epochs: int,
            generator: torch.Generator) -> None:
        """``epochs`` passes over the smaller side, each batch half members, half non-members."""
        pm, om = self._inputs(members)
        pn, on = self._inputs(nonmembers)
        half = self.batch_size // 2
        steps = max(1, min(len(members), len(nonmembers)) // half)
        target = torch.cat([torch.ones(half), torch.zeros(half)]).to(self.device)
        loss_fn = nn.BCEWithLogitsLoss()
        self.model.train()
        for _ in range(epochs):
            im = torch.randperm(len(members), generator=generator)
            inn = torch.randperm(len(nonmembers), generator=generator)
            for s in range(steps):
                bm = im[s * half:(s + 1) * half].to(self.device)
                bn = inn[s * half:(s + 1) * half].to(self.device)
                if len(bm) < half or len(bn) < half:  # sets smaller than half a batch
                    bm = im[torch.arange(half) % len(im)].to(self.device)
                    bn = inn[torch.arange(half) % len(inn)].to(self.device)
                out = self.model(torch.cat([pm[bm], pn[bn]]), torch.cat([om[bm], on[bn]]))
                loss = loss_fn(out, target)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()

    @torch.no_grad()
    def score(self, signals: Signals) -> np.ndarray:
        """Membership probability per sample."""
        self.model.eval()
        p, o = self._inputs(signals)
        return torch.sigmoid(self.model(p, o)).float().cpu().numpy()

    def clone(self) -> "NasrAttack":
        """Deep copy, optimizer state included (warm start keeps Adam's moments)."""
        return copy.deepcopy(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()
