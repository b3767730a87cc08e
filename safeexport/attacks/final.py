"""The final membership evaluation of SPEC §4-5, as one function of a model's logits.

The compressor runs it on the PyTorch model and device_eval on an exported file, with the same
seeds and tags, so the two sets of figures differ only by the outputs the models give.
"""

from collections.abc import Callable

import numpy as np
import torch

from safeexport.attacks import (
    ATTACKS,
    AttackResult,
    MembershipResult,
    Signals,
    fit_and_score,
    is_member_of,
)
from safeexport.attacks.reference import References, reference_attacks
from safeexport.attacks.threshold import THRESHOLD_ATTACKS, threshold_attacks
from safeexport.data.splits import Splits, balanced
from safeexport.metrics import (
    RESAMPLES,
    accuracy_interval,
    chance_accuracy,
    figure_warnings,
    fold,
    tm_score,
)
from safeexport.seeding import derive_seed, generator, seeded


def final_membership(logits: Callable[[np.ndarray], np.ndarray], labels: np.ndarray,
                     splits: Splits, num_classes: int, attack: str, epochs: int, seed: int,
                     tag: str, device: torch.device, attack_seeds: int = 1,
                     references: References | None = None,
                     fitted: list | None = None) -> MembershipResult:
    """Train the ``attack`` on ALL known members/non-members and measure it on the BALANCED
    unknown members/non-members; the threshold attacks run on the same signals.
    ``logits(indices)`` gives the model's outputs on samples; softmax is applied on the host.
    With ``attack_seeds`` > 1 the attack is trained again from that many seeds: the first
    gives the figures, all of them give ``seeds`` (mean ± std of each figure). With
    ``references`` (reference models' outputs on the same samples), LiRA and RMIA too.
    ``fitted``: the attackers (one per seed) of another model's evaluation, applied here as
    they are instead of trained on this model's outputs, so that a model whose outputs equal
    that one's gets identical scores (device_eval's comparison of a file with its model)."""
    index = attack_parts(splits)
    parts = part_signals(logits, labels, index)
    runs = []
    for k in range(attack_seeds):
        tags = (tag,) if k == 0 else (tag, k)
        attacker = fitted[k] if fitted else _attacker(attack, num_classes, seed, tags, device)
        res = fit_and_score(attacker, *parts, epochs, generator(seed, "final-attack", *tags),
                            resamples=RESAMPLES if k == 0 else 0, fit=not fitted)
        runs.append((attacker, res))
    results = {attack: runs[0][1], **threshold_attacks(*parts)}
    reference = {}
    if references is not None:
        scored, reference = reference_attacks(parts, index, references)
        results.update(scored)
    spread = {}
    if attack_seeds > 1:
        spread = {"n": attack_seeds}
        for key in ("mia_acc", "auc", "tpr_at_1pct_fpr"):
            values = [r.metrics[key] for _, r in runs]
            if None not in values:
                spread[key] = {"mean": float(np.mean(values)),
                               "std": float(np.std(values, ddof=1)), "values": values}
    return MembershipResult(attack, runs[0][0], results, is_member_of(parts[2], parts[3]),
                            spread, reference, np.r_[index[2], index[3]],
                            [a for a, _ in runs])


def attack_parts(splits: Splits) -> list[np.ndarray]:
    """The known members, known non-members and the balanced unknown members and non-members
    (the order ``fit_and_score`` takes)."""
    return [splits.known_members, splits.known_nonmembers,
            *balanced(splits.unknown_members, splits.unknown_nonmembers)]


def part_signals(logits: Callable[[np.ndarray], np.ndarray], labels: np.ndarray,
                 index: list[np.ndarray]) -> list[Signals]:
    """A model's signals on each part of ``index``."""
    return [Signals.from_logits(logits(i), labels[i]) for i in index]


def _attacker(attack: str, num_classes: int, seed: int, tags: tuple, device: torch.device):
    """A fresh ``attack``, initialised from the seed the final evaluation derives for ``tags``."""
    with seeded(derive_seed(seed, "final-attacker", *tags), device):
        return ATTACKS.get(attack)(num_classes, device)


def holder_start(before: Callable[[np.ndarray], np.ndarray], labels: np.ndarray,
                 splits: Splits, num_classes: int, attack: str, epochs: int, seed: int,
                 tag: str, device: torch.device):
    """Where an attacker who holds a model starts: ``attack`` trained on the ``before``
    model's known outputs, as ``final_membership`` trains its first seed."""
    start = _attacker(attack, num_classes, seed, (tag,), device)
    start.fit(*part_signals(before, labels, attack_parts(splits)[:2]), epochs,
              generator(seed, "final-attack", tag))
    return start


def held_pair(before: Callable[[np.ndarray], np.ndarray],
              after: Callable[[np.ndarray], np.ndarray], labels: np.ndarray, splits: Splits,
              start, epochs: int, seed: int, tag: str) -> tuple[AttackResult, AttackResult]:
    """The trained attack as the holder of the ``after`` model fits it: a copy of ``start``
    (``holder_start``) trained further on the ``after`` model's OWN known outputs, then
    scoring the unknown outputs of both models (before, after; no intervals).

    ONE fitted attacker scores both models, so the pair differs by the outputs alone: equal
    outputs give equal scores, outputs that barely differ give scores that barely differ, and
    an arrangement only the ``after`` model has is learnt by the copy and read on that model
    alone. Each model's own copy, from the same start with the same batches, diverged instead:
    training amplifies a float16 rounding, and on a tiny synthetic run the two copies' paired
    AUC interval spanned -2.8 to +3.8 points (one thread; -1.2 to +1.5 with the early
    stopping off), so lossless files were INCONCLUSIVE."""
    index = attack_parts(splits)
    parts = [part_signals(m, labels, index) for m in (before, after)]
    gen = generator(seed, "holder-attack", tag)
    attacker = start.clone()
    attacker.fit(*parts[1][:2], epochs, gen)
    b, a = (fit_and_score(attacker, *p, epochs, gen, resamples=0, fit=False) for p in parts)
    return b, a


def model_figures(res: MembershipResult, test_logits: np.ndarray, test_labels: np.ndarray,
                  train_acc: float, lam: float) -> dict:
    """One model's row of a report: task accuracy on the test split (with its interval), train
    accuracy, every attack's figures (``MembershipResult.summary``), TM-score on the folded
    MIA accuracy of the STRONGEST attack measured (a collapsed trained attacker would read
    0.5 and rank the leakiest model best), ``warnings`` when the figures are unfit to rank on,
    and ``notes``: that the configured attack reads less than a threshold attack."""
    correct = np.asarray(test_logits).argmax(1) == np.asarray(test_labels)
    task = float(correct.mean())
    task_ci = accuracy_interval(correct)
    strongest = res.strongest()
    notes = []
    best = max(THRESHOLD_ATTACKS, key=lambda k: fold(res.results[k].metrics["auc"]))
    mine, theirs = res.metrics, res.results[best].metrics
    if (res.attack not in THRESHOLD_ATTACKS and fold(mine["auc"]) < fold(theirs["auc"])
            and fold(mine["mia_acc"]) < fold(theirs["mia_acc"])):
        notes.append(f"the {res.attack} attack reads less than the {best} threshold attack "
                        f"(MIA accuracy {mine['mia_acc']:.4f} vs {theirs['mia_acc']:.4f}, AUC "
                        f"{mine['auc']:.3f} vs {theirs['auc']:.3f}); the TM-score uses the "
                        f"strongest attack, {strongest}")
    return {"task_acc": task, "task_acc_ci": task_ci, "train_acc": train_acc, **res.summary(),
            "tm_score": tm_score(task, res.results[strongest].metrics["mia_acc"], lam),
            "tm_attack": strongest, "notes": notes,
            "warnings": figure_warnings(task_ci, chance_accuracy(test_labels), res.attack,
                                        res.metrics)}
