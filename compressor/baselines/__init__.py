"""The methods SafeCompress is compared with (SPEC §6), each a ``--method`` of
``safeexport compress`` writing the same run directory, so export and evaluate work on all.

A method takes the run's ``Setup`` (data, split, architecture, optimizer, seeds) and returns
the trained model's state, and the dense model when it trained one on the way (the prune
baselines start from the dense reference, which is then not trained twice).
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from compressor.masking import init_masks, maskable
from compressor.run import Setup, train_dense
from compressor.train import TrainState
from safeexport.registry import Registry
from safeexport.seeding import generator


@dataclass
class Outcome:
    """A method's trained model, the dense model it started from (with its wall time), and
    what the report should say about the method."""

    state: TrainState
    dense: tuple[TrainState, float] | None = None
    extra: dict = field(default_factory=dict)


METHODS: Registry[Callable[[Setup], Outcome]] = Registry("method")
RETRAIN_LR_SCALE = 0.1  # fine-tuning after pruning starts at a tenth of the training rate


def retrain_iters(setup: Setup) -> int:
    return setup.total * setup.cfg.retrain_epochs // setup.cfg.epochs


@METHODS.decorator("dense")
def dense(setup: Setup) -> Outcome:
    """The uncompressed model on the whole budget: the reference row of every table."""
    return Outcome(train_dense(setup)[0])


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


@METHODS.decorator("prune")
def prune(setup: Setup) -> Outcome:
    """Train dense, prune by magnitude to the sparsity, fine-tune (no defence)."""
    dense_state, dense_time = train_dense(setup)
    state = magnitude_pruned(setup, dense_state.model)
    iters = retrain_iters(setup)
    setup.train(state, "retrain", iters, setup.lr * RETRAIN_LR_SCALE, "fine-tune pruned")
    return Outcome(state, (dense_state, dense_time),
                   {"pruning": {"pretrain_iters": setup.total, "retrain_iters": iters,
                                "retrain_lr": setup.lr * RETRAIN_LR_SCALE}})
