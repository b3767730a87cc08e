"""The first step of the two-step baselines, compress: a magnitude-pruned copy of the dense
model (Pr-*), or a narrow dense student with as many weights as the sparse model keeps (KD-*);
and the losses a student learns with (labels, a teacher's soft labels, or both)."""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from compressor.masking import erk_counts, init_masks, maskable
from compressor.setup import Setup
from compressor.train import TrainState, predict_logits
from safeexport.models import check_width, weight_count, weight_shapes, width_for_budget
from safeexport.seeding import generator

RETRAIN_LR_SCALE = 0.1  # fine-tuning after pruning starts at a tenth of the training rate


@dataclass
class Student:
    """A compressed model about to be trained by a defence: its state, the iterations and
    learning rate of that training, and its model.json when it differs from the run's."""

    state: TrainState
    iters: int
    lr: float
    spec: dict | None
    distil: bool  # learns from the teacher's soft labels (KD) rather than the labels alone
    trained: bool  # starts from trained weights (Pr-*) rather than from scratch (KD-*)

    def member_targets(self, setup: Setup, teacher: torch.nn.Module) -> "Targets":
        """Its loss on the members: the labels, with the teacher's soft labels if it distils."""
        return Targets(setup, setup.splits.members, teacher if self.distil else None)


def magnitude_pruned(setup: Setup, model: torch.nn.Module) -> TrainState:
    """A copy of ``model`` keeping its largest weights: SafeCompress's per-layer budget (ERK
    counts, exact), the largest magnitudes of each layer kept."""
    pruned = copy.deepcopy(model)
    weights = [p for _, p in maskable(pruned)]
    masks = init_masks(weights, setup.cfg.sparsity, generator(setup.cfg.seed, "prune-mask"),
                       by_magnitude=True)
    state = setup.new_state(pruned, masks)
    state.masking.apply()
    return state


def retrain_iters(setup: Setup) -> int:
    """Fine-tuning iterations after pruning: ``retrain_epochs`` over the members."""
    return setup.total * setup.cfg.retrain_epochs // setup.cfg.epochs


def pruned_student(setup: Setup, teacher: torch.nn.Module) -> Student:
    """Pr-*: the dense model pruned by magnitude, fine-tuned for ``retrain_epochs`` at a
    tenth of the training rate."""
    return Student(magnitude_pruned(setup, teacher), retrain_iters(setup),
                   setup.lr * RETRAIN_LR_SCALE, None, distil=False, trained=True)


def student_budget(setup: Setup) -> int:
    """The weights a sparse model of the run keeps (what a dense student may have)."""
    shapes = weight_shapes(setup.model_name, setup.model_kwargs)
    return sum(erk_counts(shapes, setup.cfg.sparsity))


def narrow_student(setup: Setup) -> Student:
    """KD-*: a dense copy of the architecture narrowed until its Conv/Linear weights fit the
    sparse budget, trained from scratch for the whole budget by distillation."""
    check_width(setup.model_name)
    budget = student_budget(setup)
    width = width_for_budget(setup.model_name, setup.model_kwargs, budget)
    kwargs = {**setup.model_kwargs, "width": width}
    state = setup.new_state(setup.new_model("student-init", kwargs))
    return Student(state, setup.total, setup.lr, {"name": setup.model_name, "kwargs": kwargs},
                   distil=True, trained=False)


def student_report(setup: Setup, student: Student) -> dict:
    """What the report says about a narrow student's size."""
    kwargs = student.spec["kwargs"]
    return {"width": kwargs["width"], "weights": weight_count(setup.model_name, kwargs),
            "budget": student_budget(setup),
            "teacher_weights": weight_count(setup.model_name, setup.model_kwargs)}


class Targets:
    """A student's loss on a batch of dataset indices: cross-entropy on the labels, the
    teacher's soft labels at temperature T (KL, scaled by T² as Hinton et al.), or
    (1 − a)·CE + a·KL. Teacher outputs are computed once, on ``data`` only."""

    def __init__(self, setup: Setup, data: np.ndarray, teacher: torch.nn.Module | None,
                 labels: bool = True) -> None:
        self.temperature = setup.cfg.kd_temperature
        self.alpha = setup.cfg.kd_alpha if labels else 1.0
        self.soft = None
        if teacher is not None:
            self.pos = np.full(len(setup.ds), -1, dtype=np.int64)
            self.pos[data] = np.arange(len(data))
            logits = predict_logits(teacher, setup.ds, data, setup.device)
            self.soft = F.softmax(logits / self.temperature, dim=1).to(setup.device)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        if self.soft is None:
            return F.cross_entropy(logits, y)
        t = self.temperature
        soft = self.soft[torch.from_numpy(self.pos[idx]).to(self.soft.device)]
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean") * t * t
        if self.alpha == 1.0:
            return kl
        return (1 - self.alpha) * F.cross_entropy(logits, y) + self.alpha * kl


LossFn = Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]
