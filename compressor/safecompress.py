"""One SafeCompress mask update (SPEC §2, stage 2 and 3).

From the trained model M_S: one candidate per (prune, grow) pair, each fine-tuned briefly, then
tested for task accuracy (validation split) and safety (accuracy of the attacker, trained on M_S
and warm-start fine-tuned on the candidate, on the held-out half of the KNOWN members and
non-members, with a bootstrap interval). The candidate with the highest TM-score becomes the
next M_S (``--select random`` picks one at random instead: an ablation).

Each candidate is a pure function of (M_S, its gradients, the attacker, the pair, a seed derived
from the round and the pair), so candidates could run batched or in parallel without changing
results.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import torch

from compressor.config import CompressConfig
from compressor.strategies import GROW, PRUNE
from compressor.train import (
    BatchSampler,
    TrainState,
    dense_grads,
    predict_logits,
    train_steps,
)
from safeexport.attacks import ATTACKS, Attack, Signals, is_member_of
from safeexport.data import ArrayDataset
from safeexport.data.splits import Splits, balanced
from safeexport.metrics import accuracy, mia_metrics, tm_score
from safeexport.seeding import derive_seed, generator, seeded

# Resamples behind each candidate's interval: fewer than a final figure's, since 4 candidates
# are tested every round; the interval is recorded, never used to choose.
SELECT_RESAMPLES = 200


@dataclass
class SafetyTest:
    """Signals are computed once per model and cached; the attack never re-runs the target."""

    ds: ArrayDataset
    splits: Splits
    device: torch.device

    def signals(self, model: torch.nn.Module, idx: np.ndarray) -> Signals:
        """The model's softmax outputs and the true labels on ``idx``."""
        return Signals.from_logits(predict_logits(model, self.ds, idx, self.device),
                                   self.ds.y[idx])

    def attack_training_signals(self, model) -> tuple[Signals, Signals]:
        """Signals on the attacker's training part of the known members/non-members."""
        m, n = self.splits.attack_train()
        return self.signals(model, m), self.signals(model, n)

    def evaluate(self, model, attacker: Attack, lam: float, seed: int) -> dict:
        """Task test (validation accuracy) and safety test (balanced held-out known split),
        with 95% bootstrap intervals of the attack's figures."""
        val = self.splits.validation
        task = accuracy(predict_logits(model, self.ds, val, self.device).numpy(), self.ds.y[val])
        m, n = balanced(*self.splits.attack_select())
        scores = np.concatenate([attacker.score(self.signals(model, m)),
                                 attacker.score(self.signals(model, n))])
        mia = mia_metrics(scores, is_member_of(m, n), resamples=SELECT_RESAMPLES, seed=seed)
        return {"task_acc": task, **mia, "tm_score": tm_score(task, mia["mia_acc"], lam)}


@dataclass
class Candidate:
    """A candidate's model, its fine-tuned attacker and its test figures."""

    prune: str
    grow: str
    state: TrainState
    metrics: dict = field(default_factory=dict)


def make_candidate(cfg: CompressConfig, ds: ArrayDataset, splits: Splits, base: TrainState,
                   grads: list[torch.Tensor], attacker: Attack, pair: tuple[str, str],
                   rate: float, lr: float, rnd: int, loss_fn, safety: SafetyTest,
                   device: torch.device, on_step: Callable[[], None] | None) -> Candidate:
    """Prune, grow, fine-tune, then test one candidate (independent of the others)."""
    prune, grow = pair
    gen = generator(cfg.seed, "candidate", rnd, prune, grow)
    weights = [p.detach() for p in base.masking.params]
    pruned = PRUNE.get(prune)(weights, base.masking.masks, rate)
    new_masks = [
        GROW.get(grow)(w, g, pm, int(m.sum()) - int(pm.sum()), gen)
        for w, g, m, pm in zip(weights, grads, base.masking.masks, pruned, strict=True)
    ]
    state = base.clone()
    changed = state.masking.update(new_masks, state.optimizer)
    drift = [(a, b) for a, b in zip(base.masking.counts(), state.masking.counts(), strict=True)
             if a != b]
    if drift:  # exact growth is an invariant of the method, not a tolerance
        raise AssertionError(f"density drifted in candidate {prune}+{grow}: {drift}")
    sampler = BatchSampler(splits.members, cfg.batch_size, gen)
    with seeded(derive_seed(cfg.seed, "finetune", rnd, prune, grow), device):
        train_steps(state, ds, sampler, cfg.finetune_iters, loss_fn, lambda i: lr, device,
                    on_step)
    att = attacker.clone()
    att.fit(*safety.attack_training_signals(state.model), cfg.attack_finetune_epochs, gen)
    metrics = safety.evaluate(state.model, att, cfg.lam, cfg.seed)
    metrics["changed"] = changed
    metrics["attacker_fit"] = att.last_fit
    return Candidate(prune, grow, state, metrics)


def mask_update(cfg: CompressConfig, ds: ArrayDataset, splits: Splits, state: TrainState,
                rnd: int, rate: float, lr: float, loss_fn, device: torch.device,
                on_candidate: Callable[[str], None], on_step: Callable[[], None] | None
                ) -> tuple[TrainState, dict]:
    """One round: candidates from M_S, tests, TM-score selection. Returns (winner, history row)."""
    gen = generator(cfg.seed, "round", rnd)
    safety = SafetyTest(ds, splits, device)
    batch = splits.members[torch.randperm(len(splits.members), generator=gen)[:cfg.batch_size]]
    grads = dense_grads(state, ds, batch, loss_fn, device)
    with seeded(derive_seed(cfg.seed, "attacker", rnd), device):
        attacker = ATTACKS.get(cfg.attack)(ds.num_classes, device)
    attacker.fit(*safety.attack_training_signals(state.model), cfg.attack_epochs, gen)
    base_metrics = safety.evaluate(state.model, attacker, cfg.lam, cfg.seed)
    base_metrics["attacker_fit"] = attacker.last_fit
    candidates = []
    for pair in product(cfg.prune, cfg.grow):
        on_candidate(f"{pair[0]}+{pair[1]}")
        candidates.append(make_candidate(cfg, ds, splits, state, grads, attacker, pair, rate,
                                         lr, rnd, loss_fn, safety, device, on_step))
    if cfg.select == "random":
        pick = generator(cfg.seed, "select", rnd)
        win = int(torch.randint(len(candidates), (1,), generator=pick))
    else:
        win = int(np.argmax([c.metrics["tm_score"] for c in candidates]))
    row = {
        "round": rnd,
        "prune_rate": rate,
        "base": base_metrics,
        "candidates": [{"prune": c.prune, "grow": c.grow, **c.metrics} for c in candidates],
        "winner": win,
        "select": cfg.select,
        "winner_pair": f"{candidates[win].prune}+{candidates[win].grow}",
    }
    return candidates[win].state, row
