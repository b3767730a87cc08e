"""Model registry. A model is named and built from JSON kwargs (saved as ``model.json``) so any
stage can rebuild it without code from the run directory."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from safeexport.data import ArrayDataset
from safeexport.errors import ConfigError
from safeexport.models.text import TextClassifier
from safeexport.models.vision import MLP, AlexNetCifar, ResNet18Cifar, SmallCNN, VGG16Cifar
from safeexport.registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    """``build(**kwargs)`` and the data kinds the architecture accepts."""

    build: Callable[..., nn.Module]
    kinds: tuple[str, ...]
    description: str


MODELS: Registry[ModelInfo] = Registry("model")
MODELS.register("cnn", ModelInfo(SmallCNN, ("image",), "small 3-conv CNN (default for images)"))
MODELS.register("mlp", ModelInfo(MLP, ("image", "tabular"),
                                 "Nasr et al.'s MLP in-1024-512-256-128-C (default for tables)"))
MODELS.register("alexnet", ModelInfo(AlexNetCifar, ("image",), "AlexNet, CIFAR variant"))
MODELS.register("vgg16", ModelInfo(VGG16Cifar, ("image",), "VGG16 with BN, CIFAR variant"))
MODELS.register("resnet18", ModelInfo(ResNet18Cifar, ("image",), "ResNet18, CIFAR stem"))
MODELS.register("bert", ModelInfo(lambda **kw: TextClassifier("bert", **kw), ("text",),
                                  "BERT classifier (transformers)"))
MODELS.register("roberta", ModelInfo(lambda **kw: TextClassifier("roberta", **kw), ("text",),
                                     "RoBERTa classifier (transformers)"))

DEFAULT_MODEL = {"image": "cnn", "tabular": "mlp", "text": "bert"}


def check_compatible(model: str, kind: str, dataset: str) -> None:
    """Refuse a model that cannot read this kind of data, naming the ones that can."""
    info = MODELS.get(model)
    if kind not in info.kinds:
        ok = [n for n in MODELS.names() if kind in MODELS.get(n).kinds]
        raise ConfigError(f"model {model} takes {'/'.join(info.kinds)} data but {dataset} is "
                          f"{kind} data; use one of: {', '.join(ok)}")


def image_kwargs(model: str, ds: ArrayDataset, train_idx: np.ndarray) -> dict:
    """Constructor kwargs for an image or tabular model, from the data (stats of training data
    only, so normalisation leaks nothing about non-members)."""
    if model == "mlp":
        return {"in_features": int(np.prod(ds.input_shape())), "num_classes": ds.num_classes}
    x = ds.x[train_idx].astype(np.float32) / 255.0
    std = x.std(axis=(0, 2, 3))
    return {"in_channels": int(ds.x.shape[1]), "num_classes": ds.num_classes,
            "input_size": list(ds.x.shape[2:]),
            "mean": [round(float(m), 6) for m in x.mean(axis=(0, 2, 3))],
            "std": [round(float(max(s, 1e-3)), 6) for s in std]}


def build_model(name: str, kwargs: dict) -> nn.Module:
    """Instantiate a registered model from its JSON kwargs."""
    try:
        return MODELS.get(name).build(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name}: bad arguments in model.json ({e})") from e
