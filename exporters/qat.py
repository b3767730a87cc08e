"""Quantization-aware fine-tuning before a low-bit export (``--finetune-epochs N``).

The run's model is trained further on its members (the training split) with every weight the
exporter quantizes replaced, in the forward pass, by the exporter's own quantization of it:
``quantize_channels``' per-output-channel levels at its MSE-searched scale, recomputed from the
current weights at every step, with the gradient passed straight through to the float weights
(the straight-through estimator; the scale follows the weights, as an observer-based
fake-quantizer's does, instead of being learnt). The file then stores exactly the levels the
model was fine-tuned with: the exporter quantizes the same float weights the same way, and the
batch-norm folding of the exporters scales whole output channels, which the scale search
follows. The mask is fixed: pruned weights are set back to exactly zero after every step.

Written here rather than taken from a library: torchao's QAT fake-quantizers cover nn.Linear
and nn.Embedding only, and the point is to train against this exporter's levels and scales (its
scale search, zero as a level), which no library quantizer reproduces.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from exporters.quantize import dequantize, quantize_channels
from safeexport.seeding import generator

METHOD = ("straight-through fine-tuning against safeexport's per-channel MSE quantizer "
          "(recomputed every step), pruned weights held at zero")
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear)  # the conv/linear weights both formats store


class _FakeQuant(nn.Module):
    """``w`` as the exporter stores it at ``bits`` (levels × per-output-channel scale) in the
    forward pass; the identity for the gradient."""

    def __init__(self, bits: int, asymmetric: bool) -> None:
        super().__init__()
        self.bits, self.asymmetric = bits, asymmetric

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        levels, scale = quantize_channels(w.detach().cpu().numpy(), self.bits, 0,
                                          self.asymmetric)
        stored = torch.from_numpy(dequantize(levels, scale, 0)).to(w)
        return w + (stored - w).detach()


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


@dataclass
class FineTuned:
    """The fine-tuned model (float weights, which the exporter quantizes), its logits with the
    quantized weights on the parity inputs, and what the manifest records."""

    model: nn.Module
    quantized_logits: np.ndarray
    record: dict


def finetune(model: nn.Module, inputs: Callable[[np.ndarray], np.ndarray], labels: np.ndarray,
             members: np.ndarray, parity_inputs: np.ndarray, bits: int, epochs: int, lr: float,
             batch_size: int, seed: int, keep: set[str], asymmetric: bool = False,
             progress: bool | None = None,
             on_step: Callable[[nn.Module], None] | None = None) -> FineTuned:
    """``epochs`` epochs of Adam (``lr``) on the ``members`` (``inputs(idx)``, ``labels``) with
    the quantized weights in the forward pass, from a copy of ``model``. Batch norm keeps its
    running statistics and dropout is off (the model is fine-tuned as it is deployed).
    ``on_step(model)`` is called after every step, pruned weights already zeroed."""
    model = copy.deepcopy(model).eval()
    every = quantized_modules(model, set())  # the kept ones are fine-tuned too, in float
    masks = [m.weight.detach() != 0 for _, m in every]
    layers = quantized_modules(model, keep)
    for _, m in layers:
        parametrize.register_parametrization(m, "weight", _FakeQuant(bits, asymmetric))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = generator(seed, "quantization-aware fine-tuning", bits)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    steps = epochs * -(-len(members) // batch_size)
    with tqdm(total=steps, desc=f"fine-tune {bits}-bit", unit="step",
              disable=None if progress is None else not progress) as bar:
        for _ in range(epochs):
            order = members[torch.randperm(len(members), generator=gen).numpy()]
            total = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                logits = model(torch.from_numpy(inputs(idx)))
                loss = loss_fn(logits, torch.from_numpy(np.asarray(labels[idx])).long())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for (_, m), mask in zip(every, masks, strict=True):
                        float_weight(m).mul_(mask)
                total += float(loss) * len(idx)
                bar.update()
                if on_step is not None:
                    on_step(model)
            losses.append(total / len(order))
    with torch.no_grad():
        quantized_logits = model(torch.from_numpy(parity_inputs)).numpy()
    for _, m in layers:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    record = {"method": METHOD, "epochs": epochs, "lr": lr, "optimizer": "adam",
              "batch_size": batch_size, "samples": {"split": "members", "count": len(members)},
              "loss_per_epoch": losses, "layers": [name for name, _ in layers]}
    return FineTuned(model, quantized_logits, record)
