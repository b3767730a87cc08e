"""Training primitives shared by the SafeCompress loop and the dense reference: a resumable
batch sampler, a cosine learning-rate schedule, masked SGD steps, inference and dense gradients."""

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from compressor.masking import Masking
from safeexport import names
from safeexport.data import ArrayDataset, to_tensor
from safeexport.errors import TrainingError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    from safeexport.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA but this torch build has no usable "
                          "GPU; use --device cpu or auto")
    return torch.device(name)


def cosine(base: float, it: int, total: int) -> float:
    """``base`` annealed along half a cosine from it=0 to it=total (0 at the end)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(it, total) / max(total, 1)))


MULTISTEP = (0.5, 0.75)  # fractions of the budget where the multi-step schedule divides by 10


def learning_rate(schedule: str, base: float, it: int, total: int) -> float:
    """Step ``it``'s rate: ``cosine`` anneals ``base`` to 0; ``multistep`` divides it by 10 at
    half and at three quarters of the budget (MultiStepLR as the SafeCompress paper's code,
    built on Dettmers & Zettlemoyer's sparse-learning, schedules it), written here as a pure
    function of the step so a resumed run and every candidate read the same rate."""
    if schedule == "multistep":
        return base * 0.1 ** sum(it >= int(f * total) for f in MULTISTEP)
    return cosine(base, it, total)


def iters_per_epoch(n: int, batch_size: int) -> int:
    """Full batches in one pass over ``n`` samples (a batch is at most ``n``)."""
    return n // min(batch_size, n)


class BatchSampler:
    """Endless shuffled batches of ``indices`` (epochs without replacement, last partial batch
    dropped); its whole state can be saved, so a resumed run draws the same batches."""

    def __init__(self, indices: np.ndarray, batch_size: int, gen: torch.Generator) -> None:
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.batch_size = min(batch_size, len(self.indices))
        self.gen = gen
        self.perm = torch.randperm(len(self.indices), generator=self.gen)
        self.pos = 0

    def iters_per_epoch(self) -> int:
        """Batches per pass over the indices."""
        return iters_per_epoch(len(self.indices), self.batch_size)

    def next(self) -> np.ndarray:
        """The next batch of dataset indices."""
        if self.pos + self.batch_size > len(self.perm):
            self.perm = torch.randperm(len(self.indices), generator=self.gen)
            self.pos = 0
        batch = self.indices[self.perm[self.pos:self.pos + self.batch_size]]
        self.pos += self.batch_size
        return batch.numpy()

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        """(tensors, position) to checkpoint."""
        return {"sampler.perm": self.perm, "sampler.gen": self.gen.get_state()}, self.pos

    def load_state(self, tensors: dict[str, torch.Tensor], pos: int) -> None:
        """Restore what ``state`` returned."""
        self.perm = tensors["sampler.perm"].clone()
        self.gen.set_state(tensors["sampler.gen"])
        self.pos = pos


@dataclass
class TrainState:
    """A model being trained, its optimizer, and its masks (None for a dense model)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    masking: Masking | None

    def clone(self) -> "TrainState":
        """An independent copy: weights, optimizer state (momentum) and masks."""
        model = copy.deepcopy(self.model)
        # load_state_dict restores every hyper-parameter of the param groups too
        opt = type(self.optimizer)(model.parameters(), lr=self.optimizer.defaults["lr"])
        opt.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        masking = (Masking(model, [m.clone() for m in self.masking.masks])
                   if self.masking is not None else None)
        return TrainState(model, opt, masking)


# default learning rate of each of names.OPTIMIZERS
DEFAULT_LR = dict(zip(names.OPTIMIZERS, (0.05, 1e-3), strict=True))


def resolve_optimizer(name: str, model: str, lr: float | None,
                      pretrained: bool) -> tuple[str, float]:
    """(optimizer, learning rate) after defaults: SGD for CNNs as in the paper; AdamW for
    transformers (plain SGD barely moves them), at a 20x smaller rate when fine-tuning, and for
    MLPs. A sparse tanh MLP has no normalisation to restore its step size: each unit sums the
    updates of the few weights it keeps, so at the paper's SGD rate SafeCompress's 5%-dense MLP
    learned a fraction of what the pruned dense one did (purchase-like table, 20 epochs: test
    accuracy 0.08 against 0.35, 0.13 with the mask never updated); AdamW's per-weight steps
    take it to 0.53 (docs/results/tabular.md)."""
    if name == "auto":
        name = "adamw" if model in ("bert", "roberta", "mlp") else "sgd"
    if lr is None:
        lr = DEFAULT_LR[name] * (0.05 if pretrained and name == "adamw" else 1.0)
    return name, lr


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW; the schedule sets the learning rate every step."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                               weight_decay=weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def batch_tensors(ds: ArrayDataset, idx: np.ndarray,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of ``idx`` on ``device``."""
    x = to_tensor(ds.x[idx]).to(device, non_blocking=True)
    y = torch.from_numpy(ds.y[idx]).to(device, non_blocking=True)
    return x, y


def training_batch(ds: ArrayDataset, idx: np.ndarray,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_tensors`` with the dataset's training augmentation applied (the target's
    training steps only; evaluation and attacks read the stored inputs)."""
    x, y = batch_tensors(ds, idx, device)
    return (x if ds.augment is None else ds.augment(x)), y


def autocast(device: torch.device, enabled: bool = True):
    """bfloat16 mixed precision on CUDA; a no-op on CPU or when not ``enabled``."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=enabled and device.type == "cuda")


def train_batches(state: TrainState, batches: Iterable[np.ndarray],
                  loss_fn: Callable[[np.ndarray], torch.Tensor], lr: Callable[[int], float],
                  on_step: Callable[[], None] | None = None) -> list[float]:
    """One optimizer step per batch of dataset indices; ``loss_fn(indices)`` runs the model
    and gives the batch's loss, ``lr(i)`` step i's learning rate. Masked weights stay exactly
    zero (their gradient is masked before the step and the weights re-masked after)."""
    state.model.train()
    losses = []
    for i, idx in enumerate(batches):
        for g in state.optimizer.param_groups:
            g["lr"] = lr(i)
        loss = loss_fn(idx)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(
                f"training diverged: the loss became {value} at step {i + 1} (learning rate "
                f"{lr(i):.3g}); lower --lr, or check the data for extreme values")
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if state.masking is not None:
            state.masking.mask_grads()
        state.optimizer.step()
        if state.masking is not None:
            state.masking.apply()
        losses.append(value)
        if on_step is not None:
            on_step()
    return losses


def model_loss(model: nn.Module, ds: ArrayDataset, device: torch.device,
               loss_fn: Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor],
               mixed: bool = True) -> Callable[[np.ndarray], torch.Tensor]:
    """``train_batches``'s loss from ``loss_fn(logits, labels, indices)``: the model's forward
    on the batch, augmented if the data says so (bfloat16 autocast on CUDA unless ``mixed``
    is off), logits as float32."""
    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        x, y = training_batch(ds, idx, device)
        with autocast(device, mixed):
            logits = model(x)
        return loss_fn(logits.float(), y, idx)

    return batch_loss


def train_steps(state: TrainState, ds: ArrayDataset, sampler: BatchSampler, n: int,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                lr: Callable[[int], float], device: torch.device,
                on_step: Callable[[], None] | None = None) -> list[float]:
    """``n`` steps on the sampler's batches with ``loss_fn(logits, labels)``."""
    loss = model_loss(state.model, ds, device, lambda logits, y, _: loss_fn(logits, y))
    return train_batches(state, (sampler.next() for _ in range(n)), loss, lr, on_step)


@torch.no_grad()
def predict_logits(model: nn.Module, ds: ArrayDataset, idx: np.ndarray, device: torch.device,
                   batch_size: int = 512) -> torch.Tensor:
    """float32 CPU logits of ``model`` on samples ``idx`` (eval mode), computed in float32
    even on CUDA: the task test and every attack signal read these, and bfloat16 logits (8
    bits of mantissa) would round away the confidence differences an attack measures (cuDNN's
    TF32 convolutions are turned off here for the same reason)."""
    model.eval()
    out = []
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for s in range(0, len(idx), batch_size):
            x, _ = batch_tensors(ds, idx[s:s + batch_size], device)
            out.append(model(x).float().cpu())
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def dense_grads(state: TrainState, ds: ArrayDataset, idx: np.ndarray,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                device: torch.device) -> list[torch.Tensor]:
    """Gradient of the loss on one batch w.r.t. every masked weight, at ALL positions (RigL's
    growth signal); weights and optimizer are untouched (BN running stats see one batch)."""
    model = state.model
    model.train()
    x, y = batch_tensors(ds, idx, device)
    params = state.masking.params
    with autocast(device):
        logits = model(x)
    grads = torch.autograd.grad(loss_fn(logits.float(), y), params)
    return [g.detach() for g in grads]
