"""The in-memory dataset every loader returns, and its conversion to model inputs."""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from safeexport.errors import DataError

KINDS = ("image", "tabular", "text")


@dataclass
class ArrayDataset:
    """A whole dataset held in memory.

    ``x`` is uint8 N×C×H×W for images (0..255), float32 N×D for tabular data, and a 1-D array of
    strings for text (token ids replace it once a tokenizer is fitted; see
    ``safeexport.data.text``).
    ``y`` holds int64 class indices in ``[0, num_classes)``.
    """

    name: str
    kind: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    # the target's training batches go through it (inputs as model tensors); nothing else does
    augment: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False,
                                                                   compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"dataset kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.x) != len(self.y):
            raise DataError(f"{self.name}: {len(self.x)} inputs but {len(self.y)} labels")
        if len(self.y) == 0:
            raise DataError(f"{self.name}: the dataset is empty")
        self.y = np.asarray(self.y, dtype=np.int64)
        if self.y.min() < 0 or self.y.max() >= self.num_classes:
            raise DataError(
                f"{self.name}: labels must lie in [0, {self.num_classes}), "
                f"found {self.y.min()}..{self.y.max()}"
            )
        if self.kind == "image" and (self.x.ndim != 4 or self.x.dtype != np.uint8):
            raise DataError(f"{self.name}: images must be uint8 N×C×H×W, got "
                            f"{self.x.dtype} {self.x.shape}")
        if self.kind == "tabular" and self.x.ndim != 2:
            raise DataError(f"{self.name}: tabular data must be N×D, got {self.x.shape}")
        if self.x.dtype.kind == "c":
            raise DataError(f"{self.name}: inputs are complex numbers; models take real ones")
        if self.x.dtype.kind == "f" and not np.isfinite(self.x).all():
            raise DataError(f"{self.name}: {int((~np.isfinite(self.x)).sum())} input values are "
                            "NaN or infinite; clean or impute them first")
        present = len(np.unique(self.y))
        if present < 2:
            raise DataError(f"{self.name}: every sample has label {self.y[0]}; membership "
                            "inference and task accuracy need at least two classes")

    def __len__(self) -> int:
        return len(self.y)

    def fingerprint(self) -> str:
        """sha256 of the raw inputs and labels, so a later stage can refuse other data."""
        h = hashlib.sha256()
        h.update(f"{self.kind}|{self.x.dtype}|{self.x.shape}|{self.num_classes}".encode())
        if self.x.dtype.kind == "U":
            for s in self.x:
                h.update(s.encode("utf-8"))
                h.update(b"\0")
        else:
            h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(self.y.tobytes())
        return h.hexdigest()

    def subset(self, max_samples: int, seed: int) -> "ArrayDataset":
        """A class-stratified random subset of at most ``max_samples`` samples."""
        if max_samples >= len(self):
            return self
        idx = stratified_sample(self.y, max_samples, seed)
        return ArrayDataset(self.name, self.kind, self.x[idx], self.y[idx], self.num_classes,
                            self.class_names)

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input (C, H, W), (D,) or (L,)."""
        return tuple(self.x.shape[1:])


def stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation in which every contiguous slice keeps the class proportions (±1):
    classes are interleaved by their rank within the class, scaled by the class's share."""
    order = rng.permutation(len(y))
    rank = np.empty(len(y), dtype=np.float64)
    for c in np.unique(y):
        members = order[y[order] == c]
        rank[members] = (np.arange(len(members)) + rng.random()) * (len(y) / len(members))
    return order[np.argsort(rank[order], kind="stable")]


def stratified_sample(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` samples drawn so each class keeps its share."""
    return np.sort(stratified_order(y, np.random.default_rng(seed))[:n])


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """Turn a slice of ``ArrayDataset.x`` into the model's input tensor.

    Images become float32 in [0, 1] (normalisation lives in the model, so exported files take
    the same input); tabular stays float32; token ids stay int64.
    """
    if x.dtype == np.uint8:
        return torch.from_numpy(x).float().div_(255.0)
    if x.dtype.kind == "f":
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.dtype.kind in "iu":
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
    raise DataError(f"cannot feed inputs of dtype {x.dtype} to a model (tokenize text first)")
