"""Training-time augmentation of natural images: random crop with zero padding and horizontal
flip, as the SafeCompress paper trains its CIFAR and Tiny-ImageNet models. Only the target's
training batches are augmented; every evaluation and every attack reads the images as stored.

Written here, not taken from torchvision: torchvision's wheels do not import beside the CPU
torch build this project pins, and the two transforms are a few tensor operations on a batch.
"""

import torch

from safeexport.errors import ConfigError

NATURAL_IMAGES = ("cifar10", "cifar100", "tinyimagenet")  # what ``auto`` augments
PAD = 4


def crop_flip(x: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Each image of the N×C×H×W batch shifted by a random crop of its ``pad``-zero-padded
    copy, and mirrored left-right with probability 1/2 (offsets and flips from torch's global
    RNG, which the training loop seeds and checkpoints)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,)).to(x.device) for _ in range(2))
    flip = (torch.rand(n) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(
        0, 3, 1, 2)


def resolve_augment(name: str, dataset: str, kind: str) -> str:
    """``crop-flip`` or ``none`` for ``--augment name`` on this data: ``auto`` augments the
    natural-image datasets only (a flipped digit is another digit); crop-flip on data that are
    not images is refused."""
    if name == "auto":
        return "crop-flip" if dataset in NATURAL_IMAGES else "none"
    if name == "crop-flip" and kind != "image":
        raise ConfigError(f"--augment crop-flip needs images, but {dataset} is {kind} data; "
                          "use --augment none")
    return name
