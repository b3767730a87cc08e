"""Quantization-aware fine-tuning before a low-bit export (``--finetune-epochs N``).

The run's model is trained further on its members (the training split) with every weight the
exporter quantizes replaced, in the forward pass, by per-output-channel levels times a scale
(the straight-through estimator for the rounding), towards the run's own float model's outputs
(distillation: the KL divergence from its softmax), not the labels.

- **Learnt step sizes** (LSQ, Esser et al. 2020): each channel's scale is a parameter, started
  at the exporter's MSE-searched scale (``quantize_channels``) and trained with the weights, at
  the learning rate divided by the largest level (under Adam, LSQ's gradient scale would have no
  effect; see ``finetune``).
- **The run's model as the target.** An export is checked against that model (agreement), the
  model the audit measured; matching its outputs on the members keeps what it learnt of them
  instead of fitting their labels further. On the README's Fashion-MNIST run it also gave the
  better test accuracy at 4, 3 and 2 bits (docs/results/fashion-mnist-export.md).
- **The file stores exactly the levels the model was fine-tuned with.** The weights are left on
  their grids (levels × learnt scale), and the exporter's quantizer finds a grid holding every
  weight exactly (it tries the scales that put a channel's largest weight on each level), also
  after the batch-norm folding, which scales whole output channels.
- **Asymmetric levels survive the folding:** a batch norm with a negative factor negates its
  channel when folded, which would turn the level −2^(k−1) into +2^(k−1); those channels
  (``folded_signs``) are fine-tuned with the levels mirrored.
- **The mask is fixed:** pruned weights are set back to exactly zero after every step (a zero
  weight is a zero level at any scale).

Written here rather than taken from a library: torchao's QAT fake-quantizers cover nn.Linear
and nn.Embedding only, and the training must use this exporter's own levels (zero as a level,
asymmetric codes) and scale search for its start.
"""

import contextlib
import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from exporters.quantize import lowest, qmax, quantize_channels
from safeexport.seeding import generator

METHOD = ("distillation from the run's model with straight-through rounding to safeexport's "
          "per-channel levels, learnt step sizes (LSQ) started at its MSE scales, pruned "
          "weights held at zero")
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear)  # the conv/linear weights both formats store


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, with the identity for the gradient."""
    return x + (torch.round(x) - x).detach()


class _FakeQuant(nn.Module):
    """``w`` as the exporter stores it at ``bits`` (levels × per-output-channel scale) in the
    forward pass, with the scales learnt (LSQ): each starts at the exporter's MSE-searched scale
    of the weights it is given (and is kept above a thousandth of that). The identity for the
    weights' gradient inside the levels' range, zero outside it (those weights are clipped).
    ``flipped`` channels (asymmetric levels only) take the levels mirrored, −top … top+1: a
    batch norm folded into them negates them, and the file's code holds −(top+1), not top+1."""

    def __init__(self, w: torch.Tensor, bits: int, asymmetric: bool,
                 flipped: torch.Tensor | None = None) -> None:
        super().__init__()
        _, scale = quantize_channels(w.detach().cpu().numpy(), bits, 0, asymmetric)
        shape = (-1,) + (1,) * (w.dim() - 1)
        start = torch.from_numpy(scale).to(w).reshape(shape)
        self.scale = nn.Parameter(start.clone())
        self.register_buffer("floor", start * 1e-3)
        low = torch.full((len(scale),) + shape[1:], float(lowest(bits, asymmetric)))
        high = torch.full_like(low, float(qmax(bits)))
        if asymmetric and flipped is not None:
            low[flipped], high[flipped] = -qmax(bits), qmax(bits) + 1
        self.register_buffer("low", low.to(w))
        self.register_buffer("high", high.to(w))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = torch.maximum(self.scale, self.floor)
        return _round_ste(torch.clamp(w / scale, self.low, self.high)) * scale


def folded_signs(model: nn.Module) -> dict[int, torch.Tensor]:
    """Per conv/linear module (by id): which output channels the batch norm that directly
    follows it (the next module registered, with as many features) scales by a negative
    factor, gamma / sqrt(var + eps): the exporters fold that factor into the weight."""
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    return {id(a): (b.weight.detach() / torch.sqrt(b.running_var + b.eps)) < 0
            for a, b in itertools.pairwise(leaves)
            if isinstance(a, WEIGHT_MODULES) and isinstance(b, nn.modules.batchnorm._BatchNorm)
            and b.affine and b.running_var is not None and b.num_features == a.weight.shape[0]}


def quantized_modules(model: nn.Module, keep: set[str]) -> list[tuple[str, nn.Module]]:
    """The modules whose weights a low-bit export quantizes: every convolution and linear layer
    not kept in float (``--keep-float``)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, WEIGHT_MODULES) and name not in keep]


def float_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a module trains: the original under a fake-quantizer."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


@contextlib.contextmanager
def _in_eval_mode(module: nn.Module):
    """``module`` in eval mode, and every submodule back in its own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class FineTuned:
    """The fine-tuned model (float weights, which the exporter quantizes), its logits with the
    quantized weights on the parity inputs, and what the manifest records."""

    model: nn.Module
    quantized_logits: np.ndarray
    record: dict


def finetune(model: nn.Module, inputs: Callable[[np.ndarray], np.ndarray], members: np.ndarray,
             parity_inputs: np.ndarray, bits: int, epochs: int, lr: float,
             batch_size: int, seed: int, keep: set[str], asymmetric: bool = False,
             progress: bool | None = None,
             on_step: Callable[[nn.Module], None] | None = None) -> FineTuned:
    """``epochs`` epochs of Adam (``lr`` annealed to 0 on a cosine; the scales lr / largest
    level) on the ``members`` (``inputs(idx)``) with the quantized weights in the forward
    pass, from a copy of ``model``, towards ``model``'s own outputs. Batch norm keeps its
    running statistics and dropout is off (the model is fine-tuned as it is deployed).
    ``on_step(model)`` is called after every step, pruned weights already zeroed. The returned
    model's weights lie on their grids."""
    teacher, model = model, copy.deepcopy(model).eval()
    every = quantized_modules(model, set())  # the kept ones are fine-tuned too, in float
    masks = [m.weight.detach() != 0 for _, m in every]
    layers = quantized_modules(model, keep)
    flipped = folded_signs(model)
    for _, m in layers:
        parametrize.register_parametrization(
            m, "weight", _FakeQuant(m.weight, bits, asymmetric, flipped.get(id(m))))
    # Adam steps a parameter by about its learning rate whatever the gradient's size, so LSQ's
    # gradient scale for the step sizes would have no effect: the scales take lr / (largest
    # level) instead, so a step moves a scale by the same fraction as it moves a weight as
    # large as the channel's largest level, at every width (at 8 bits, lr itself moved scales
    # of about 1e-3 several-fold)
    scales = [m.parametrizations.weight[0].scale for _, m in layers]
    learnt = {id(p) for p in scales}
    optimizer = torch.optim.Adam(
        [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in learnt]},
         {"params": scales, "lr": lr / qmax(bits)}], lr=lr)
    steps = epochs * -(-len(members) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = generator(seed, "quantization-aware fine-tuning", bits)
    losses = []
    with _in_eval_mode(teacher), tqdm(total=steps, desc=f"fine-tune {bits}-bit", unit="step",
                                      disable=None if progress is None else not progress) as bar:
        for _ in range(epochs):
            order = members[torch.randperm(len(members), generator=gen).numpy()]
            total = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                x = torch.from_numpy(inputs(idx))
                logits = model(x)
                with torch.no_grad():
                    target = torch.softmax(teacher(x), 1)
                loss = nn.functional.kl_div(torch.log_softmax(logits, 1), target,
                                            reduction="batchmean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    for (_, m), mask in zip(every, masks, strict=True):
                        float_weight(m).mul_(mask)
                total += loss.item() * len(idx)
                bar.update()
                if on_step is not None:
                    on_step(model)
            losses.append(total / len(order))
    with torch.no_grad():
        quantized_logits = model(torch.from_numpy(parity_inputs)).numpy()
    for _, m in layers:  # each weight left on its grid: levels × its learnt scale
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    record = {"method": METHOD, "target": "the run's model (KL divergence from its softmax)",
              "epochs": epochs, "lr": lr, "optimizer": "adam",
              "batch_size": batch_size, "samples": {"split": "members", "count": len(members)},
              "loss_per_epoch": losses, "layers": [name for name, _ in layers]}
    return FineTuned(model, quantized_logits, record)
