"""One SafeCompress mask update (SPEC §2, stage 2 and 3).

From the trained model M_S: one candidate per (prune, grow) pair, each fine-tuned briefly, then
measured for task accuracy (validation split) and safety (the membership accuracy of the in-loop
attack, ``--score``). Every candidate is measured on the SAME samples (paired), all
drawn from the known parts and the validation split:
- a trained attacker (``nasr``), trained on M_S and warm-start fine-tuned on each candidate,
  trains on one half of the known members and non-members and is measured on the other half;
- a threshold attack (``loss``, ``modified_entropy``, ...) or LiRA's z has no training noise:
  its threshold is fitted, and its accuracy read, on all the known non-members and as many
  known members (balanced), twice the samples of a half.

Selection (``select_winner``): the candidate with the highest TM-score wins only when its lead
over every other candidate exceeds the paired bootstrap standard error of the difference (the
same resamples of the validation and safety samples for every candidate). Otherwise the
candidates within one standard error of it are tied, and the tie goes to the higher task
accuracy, then the lower attack accuracy, then the lower attack AUC, then a seeded draw, never
to the order of the list; history.jsonl records the rule that decided. ``--select random``
picks one at random instead (an ablation).

Each candidate is a pure function of (M_S, its gradients, the attacker, the pair, a seed derived
from the round and the pair), so candidates could run batched or in parallel without changing
results.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
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
from safeexport.attacks.reference import LiraScore, References
from safeexport.data import ArrayDataset
from safeexport.data.splits import Splits, balanced
from safeexport.metrics import fold, mia_metrics, tm_score
from safeexport.seeding import derive_seed, generator, seeded

# Resamples behind the winner's interval (recorded for the learning curve, never used to
# choose): fewer than a final figure's, since one is drawn every round.
SELECT_RESAMPLES = 200
# Paired resamples behind the standard error of a TM-score difference (cheap: they resample
# per-sample outcomes already computed, never the models).
PAIRED_RESAMPLES = 1000


@dataclass
class Measured:
    """A model's test figures and the per-sample outcomes behind them: whether each validation
    sample was classified right, and whether the attack's decision on each safety sample
    (members first) was right. The outcomes stay in memory; history keeps the figures."""

    metrics: dict
    task_right: np.ndarray
    attack_right: np.ndarray
    scores: np.ndarray  # the attack's scores on the safety test's samples (members first)
    is_member: np.ndarray


@dataclass
class Outputs:
    """One model's logits on every sample a round's test reads, computed once."""

    logits: torch.Tensor
    position: np.ndarray  # dataset index -> row of ``logits`` (-1: not computed)
    y: np.ndarray

    def signals(self, idx: np.ndarray) -> Signals:
        rows = self.position[idx]
        if (rows < 0).any():  # the test reads only what ``SafetyTest.outputs`` computed
            raise AssertionError("a sample outside the round's test was read")
        return Signals.from_logits(self.logits[torch.as_tensor(rows)], self.y[idx], idx)


@dataclass
class SafetyTest:
    """The samples every model of a round is measured on: the validation split and the known
    members and non-members (``fit_parts``, ``test_parts``), nothing else."""

    ds: ArrayDataset
    splits: Splits
    device: torch.device
    trained_attack: bool  # the attacker trains (then it is measured on samples it did not see)

    def fit_parts(self) -> tuple[np.ndarray, np.ndarray]:
        """(members, non-members) the attack is fitted on: a half of each known part for a
        trained attacker; for a threshold attack the test's own samples (its threshold is
        chosen on balanced accuracy, so more members would not move it, only cost a
        forward pass each, on every model of every round)."""
        if self.trained_attack:
            return self.splits.attack_train()
        return self.test_parts()

    def test_parts(self) -> tuple[np.ndarray, np.ndarray]:
        """(members, non-members) of the safety test, balanced: the other half of each known
        part for a trained attacker, all the known non-members and as many known members for
        a threshold attack."""
        if self.trained_attack:
            return balanced(*self.splits.attack_select())
        return balanced(self.splits.known_members, self.splits.known_nonmembers)

    @cached_property
    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        """(every sample the test reads, dataset index -> its row): the same for every model."""
        index = np.unique(np.concatenate([self.splits.validation, *self.fit_parts(),
                                          *self.test_parts()]))
        position = np.full(len(self.ds), -1)
        position[index] = np.arange(len(index))
        return index, position

    def outputs(self, model: torch.nn.Module) -> Outputs:
        """``model``'s logits on the validation split and the fitting and test parts, in one
        pass (the attack never re-runs the target)."""
        index, position = self._read
        return Outputs(predict_logits(model, self.ds, index, self.device), position, self.ds.y)

    def fitting_signals(self, out: Outputs) -> tuple[Signals, Signals]:
        """Signals of the known members/non-members the attack is fitted on."""
        m, n = self.fit_parts()
        return out.signals(m), out.signals(n)

    def evaluate(self, out: Outputs, attacker: Attack, lam: float) -> Measured:
        """Task test (validation accuracy) and safety test (``test_parts``); no interval (a
        round's winner gets one: ``with_interval``)."""
        val = self.splits.validation
        task_right = out.signals(val).logits.argmax(1).numpy() == self.ds.y[val]
        task = float(task_right.mean())
        m, n = self.test_parts()
        scores = np.concatenate([attacker.score(out.signals(m)), attacker.score(out.signals(n))])
        is_member = is_member_of(m, n)
        mia = mia_metrics(scores, is_member, resamples=0)
        return Measured({"task_acc": task, **mia,
                         "tm_score": tm_score(task, mia["mia_acc"], lam)},
                        task_right, (scores > 0.5) == is_member, scores, is_member)


def with_interval(measured: Measured, seed: int) -> dict:
    """``measured``'s figures with 95% bootstrap intervals of the attack's figures."""
    ci = mia_metrics(measured.scores, measured.is_member, resamples=SELECT_RESAMPLES,
                     seed=seed)["ci"]
    return {**measured.metrics, "ci": ci}


@dataclass
class Candidate:
    """A candidate's model, its test figures and per-sample outcomes."""

    prune: str
    grow: str
    state: TrainState
    measured: Measured

    @property
    def metrics(self) -> dict:
        return self.measured.metrics


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
    out = safety.outputs(state.model)
    att.fit(*safety.fitting_signals(out), cfg.attack_finetune_epochs, gen)
    measured = safety.evaluate(out, att, cfg.lam)
    measured.metrics.update(changed=changed, attacker_fit=att.last_fit)
    return Candidate(prune, grow, state, measured)


def select_winner(measured: list[Measured], lam: float, seed: int) -> dict:
    """The TM-score winner, declared only when its lead over every other candidate exceeds
    the paired standard error of the difference; otherwise the tie rule (module docstring).
    Returns ``winner``, ``rule`` (tm, task_acc, mia_acc, auc or draw: what decided),
    ``leader`` (the highest TM-score), ``tied`` (the candidates within one standard error of
    it, the leader included) and ``tm_se`` (each candidate's paired standard error against
    the leader; None for the leader)."""
    tm = np.array([t.metrics["tm_score"] for t in measured])
    leader = int(np.argmax(tm))
    rng = np.random.default_rng(seed)
    task = np.stack([t.task_right for t in measured]).astype(np.float64)   # candidates x samples
    right = np.stack([t.attack_right for t in measured]).astype(np.float64)
    # one set of resamples for every candidate (paired): validation samples, and members and
    # non-members of the safety test apart (members come first, as balanced as the test)
    half = right.shape[1] // 2
    vi = rng.integers(0, task.shape[1], (PAIRED_RESAMPLES, task.shape[1]))
    mi = rng.integers(0, half, (PAIRED_RESAMPLES, half))
    ni = half + rng.integers(0, right.shape[1] - half, (PAIRED_RESAMPLES, right.shape[1] - half))
    task_b = task[:, vi].mean(axis=2)                                   # candidates x resamples
    mia_b = np.concatenate([right[:, mi], right[:, ni]], axis=2).mean(axis=2)
    tm_b = task_b ** lam / np.maximum(mia_b, 1 - mia_b)  # TM-score folds the attack accuracy
    se = (tm_b[leader] - tm_b).std(axis=1, ddof=1)
    tied = [i for i in range(len(measured)) if i == leader or tm[leader] - tm[i] <= se[i]]
    out = {"leader": leader, "tied": tied,
           "tm_se": [None if i == leader else float(se[i]) for i in range(len(measured))]}
    if len(tied) == 1:
        return {**out, "winner": leader, "rule": "tm"}
    keys = (("task_acc", lambda m: -m["task_acc"]), ("mia_acc", lambda m: fold(m["mia_acc"])),
            ("auc", lambda m: fold(m["auc"])))
    for rule, key in keys:
        values = [key(measured[i].metrics) for i in tied]
        tied = [i for i, v in zip(tied, values, strict=True) if v == min(values)]
        if len(tied) == 1:
            return {**out, "winner": tied[0], "rule": rule}
    return {**out, "winner": int(rng.choice(tied)), "rule": "draw"}


def in_loop_attack(cfg: CompressConfig, ds: ArrayDataset, rnd: int, device: torch.device,
                   references: References | None) -> Attack:
    """A fresh attack of ``--score`` for round ``rnd``: LiRA's z against the run's
    ``references``, or a registered attack."""
    if cfg.score == "lira":
        if references is None:
            raise AssertionError("--score lira reached the loop without references")
        return LiraScore(references, ds.y)
    with seeded(derive_seed(cfg.seed, "attacker", rnd), device):
        return ATTACKS.get(cfg.score)(ds.num_classes, device)


def mask_update(cfg: CompressConfig, ds: ArrayDataset, splits: Splits, state: TrainState,
                rnd: int, rate: float, lr: float, loss_fn, device: torch.device,
                on_candidate: Callable[[str], None], on_step: Callable[[], None] | None,
                references: References | None = None) -> tuple[TrainState, dict]:
    """One round: candidates from M_S, tests, TM-score selection. Returns (winner, history row).
    ``references``: the run's reference models' outputs (``--score lira``)."""
    gen = generator(cfg.seed, "round", rnd)
    attacker = in_loop_attack(cfg, ds, rnd, device, references)
    # an attack registered without ``trains`` is treated as trained: measured on held-out samples
    safety = SafetyTest(ds, splits, device, getattr(attacker, "trains", True))
    batch = splits.members[torch.randperm(len(splits.members), generator=gen)[:cfg.batch_size]]
    grads = dense_grads(state, ds, batch, loss_fn, device)
    out = safety.outputs(state.model)
    attacker.fit(*safety.fitting_signals(out), cfg.attack_epochs, gen)
    base_metrics = safety.evaluate(out, attacker, cfg.lam).metrics
    base_metrics["attacker_fit"] = attacker.last_fit
    candidates = []
    for pair in product(cfg.prune, cfg.grow):
        on_candidate(f"{pair[0]}+{pair[1]}")
        candidates.append(make_candidate(cfg, ds, splits, state, grads, attacker, pair, rate,
                                         lr, rnd, loss_fn, safety, device, on_step))
    selection = select_winner([c.measured for c in candidates], cfg.lam,
                              derive_seed(cfg.seed, "paired", rnd))
    if cfg.select == "random":
        pick = generator(cfg.seed, "select", rnd)
        selection.update(winner=int(torch.randint(len(candidates), (1,), generator=pick)),
                         rule="random")
    win = selection["winner"]
    figures = [with_interval(c.measured, cfg.seed) if i == win else c.metrics
               for i, c in enumerate(candidates)]
    row = {
        "round": rnd,
        "prune_rate": rate,
        "base": base_metrics,
        "candidates": [{"prune": c.prune, "grow": c.grow, **f}
                       for c, f in zip(candidates, figures, strict=True)],
        "score": cfg.score,
        "select": cfg.select,
        **selection,
        "safety_samples": [len(p) for p in safety.test_parts()],
        "winner_pair": f"{candidates[win].prune}+{candidates[win].grow}",
    }
    return candidates[win].state, row
