"""Model registry. A model is named and built from JSON kwargs (saved as ``model.json``) so any
stage can rebuild it without code from the run directory.

Besides the built-in names, a model is a user's factory, named ``package.module:factory`` (from
the working directory or PYTHONPATH) or installed as a plugin under the ``safeexport.models``
entry-point group. A factory is called as ``factory(input_shape=(C, H, W) or (D,),
num_classes=K)`` and returns an ``nn.Module`` taking float inputs (images scaled to [0, 1]).
model.json records the name, so export and evaluate import the same factory again: a run
names code that is already installed, it never carries code itself.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

import numpy as np
import torch
from torch import nn

from safeexport import names
from safeexport.data import ArrayDataset
from safeexport.errors import ConfigError
from safeexport.models.text import TextClassifier
from safeexport.models.vision import MLP, AlexNetCifar, ResNet18Cifar, SmallCNN, VGG16Cifar
from safeexport.plugins import import_object, is_ref, user_code
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
MODELS.check(names.MODELS)

DEFAULT_MODEL = {"image": "cnn", "tabular": "mlp", "text": "bert"}

ENTRY_POINT_GROUP = "safeexport.models"
USER_KINDS = ("image", "tabular")  # what a factory's (input_shape, num_classes) can describe


def plugin_names() -> list[str]:
    """Models installed by other packages under the ``safeexport.models`` entry points."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def known_model(name: str) -> bool:
    """Whether ``name`` can name a model (checked without importing anything): a built-in, a
    plugin, or a ``package.module:factory`` reference."""
    return name in MODELS or is_ref(name) or name in plugin_names()


def _user_build(ref: str, factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``build(**model_json_kwargs)`` for a user factory: calls it with the input shape and
    class count and checks that it built a module."""

    def build(input_shape: list[int], num_classes: int) -> nn.Module:
        try:
            with user_code(f"model factory {ref}"):
                model = factory(input_shape=tuple(input_shape), num_classes=num_classes)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's code; its error is the message
            raise ConfigError(f"model factory {ref} failed to build a model for input_shape="
                              f"{tuple(input_shape)}, num_classes={num_classes}: "
                              f"{type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model factory {ref} returned {type(model).__name__}, not a "
                              "torch.nn.Module")
        return model

    return build


def model_info(name: str) -> ModelInfo:
    """The built-in model ``name``, a plugin of that name, or the user factory
    ``package.module:factory``; a ConfigError naming the choices otherwise."""
    if name in MODELS:
        return MODELS.get(name)
    if is_ref(name):
        return ModelInfo(_user_build(name, import_object(name, "model factory")), USER_KINDS,
                         f"user model {name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            with user_code(f"model plugin {name} ({ep.value})"):
                factory = ep.load()
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - an installed plugin can fail in any way
            raise ConfigError(f"cannot load the model plugin {name} ({ep.value}): "
                              f"{type(e).__name__}: {e}") from e
        return ModelInfo(_user_build(name, factory), USER_KINDS, f"plugin model {ep.value}")
    known = [*MODELS.names(), *plugin_names()]
    raise ConfigError(f"unknown model {name!r}; known: {', '.join(known)}, or your own as "
                      "package.module:factory")


def resolved_model(model: str, dataset: str) -> str:
    """The model ``auto`` stands for on ``dataset`` (told without loading it), for names and
    titles; ``model`` itself when it is not auto or the data's kind cannot be told."""
    if model != "auto":
        return model
    from safeexport.data import dataset_kind

    return DEFAULT_MODEL.get(dataset_kind(dataset), model)


def check_compatible(model: str, kind: str, dataset: str) -> None:
    """Refuse a model that cannot read this kind of data, naming the ones that can."""
    info = model_info(model)
    if kind not in info.kinds:
        ok = [n for n in MODELS.names() if kind in MODELS.get(n).kinds]
        raise ConfigError(f"model {model} takes {'/'.join(info.kinds)} data but {dataset} is "
                          f"{kind} data; use one of: {', '.join(ok)}")


def image_kwargs(model: str, ds: ArrayDataset, train_idx: np.ndarray) -> dict:
    """Constructor kwargs for an image or tabular model, from the data (stats of training data
    only, so normalisation leaks nothing about non-members). A user's model gets the input
    shape and class count."""
    if model not in MODELS:
        return {"input_shape": list(ds.input_shape()), "num_classes": ds.num_classes}
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
        return model_info(name).build(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name}: bad arguments in model.json ({e})") from e


# model.json's "norm" when a DP-SGD baseline changed a model's normalisation: FOLDED_NORM, the
# BatchNorm layers that follow a convolution folded into it (then Opacus's validator for any
# left), or OPACUS_NORM, every BatchNorm replaced by Opacus's validator (a student trained from
# scratch). Rebuilding applies the same change, so the weights fit again.
OPACUS_NORM = "opacus-fix"
FOLDED_NORM = "bn-folded"
NORMS = (OPACUS_NORM, FOLDED_NORM)
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm whose input is a convolution's output (used by nothing else) into
    that convolution, with the BatchNorm's running statistics (torch's ``fuse_conv_bn_eval``),
    in place: the convolution gains the folded bias, the BatchNorm becomes ``nn.Identity``, and
    module names stay, so masks and state-dict keys still fit. The eval-mode function is
    unchanged. Returns how many were folded; 0 for a model torch.fx cannot trace (its pairs
    cannot be found without running it)."""
    import torch.fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    bn_types = nn.modules.batchnorm._BatchNorm
    if not any(isinstance(m, bn_types) for m in model.modules()):
        return 0
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - a user's model may not be traceable in any way
        return 0
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        src = node.args[0] if node.args else None
        if (node.op == "call_module" and isinstance(modules.get(node.target), bn_types)
                and isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), CONV_LAYERS) and len(src.users) == 1
                and calls[src.target] == calls[node.target] == 1):
            pairs.append((src.target, node.target))
    training = model.training
    model.eval()
    for conv, bn in pairs:
        model.set_submodule(conv, fuse_conv_bn_eval(modules[conv], modules[bn]))
        model.set_submodule(bn, nn.Identity())
    model.train(training)
    return len(pairs)


def private_norm(model: nn.Module, fold: bool) -> tuple[nn.Module, str | None]:
    """``model`` made trainable by DP-SGD, and model.json's norm for it: with ``fold``, the
    BatchNorm layers after convolutions folded into them (a trained model keeps what it
    learned), then Opacus's ``ModuleValidator.fix`` for any normalisation still invalid."""
    from opacus.validators import ModuleValidator

    folded = fold_batchnorm(model) if fold else 0
    if not ModuleValidator.is_valid(model):
        model = ModuleValidator.fix(model)
        return model, FOLDED_NORM if fold else OPACUS_NORM
    return model, FOLDED_NORM if folded else None


def build_from_spec(spec: dict) -> nn.Module:
    """The model a run's model.json describes: name, kwargs and, for a model trained with
    DP-SGD, the normalisation change ``private_norm`` made."""
    model = build_model(spec["name"], spec["kwargs"])
    norm = spec.get("norm")
    if norm is None:
        return model
    if norm not in NORMS:
        raise ConfigError(f"model.json: unknown norm {norm!r} (known: {', '.join(NORMS)})")
    return private_norm(model, fold=norm == FOLDED_NORM)[0]


# The layers whose weights a sparsity budget counts (and the compressor masks).
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def weight_shapes(name: str, kwargs: dict) -> list[tuple[int, ...]]:
    """Shapes of the model's Conv and Linear weights, in module order, from a model built on
    the meta device (nothing is allocated or initialised)."""
    with torch.device("meta"):
        model = build_model(name, kwargs)
    return [tuple(m.weight.shape) for m in model.modules()
            if isinstance(m, WEIGHT_LAYERS) and m.weight is not None]


def weight_count(name: str, kwargs: dict) -> int:
    """Weights of the model's Conv and Linear layers (what a sparsity budget counts)."""
    return sum(math.prod(s) for s in weight_shapes(name, kwargs))


WIDTH_MODELS = ("cnn", "mlp", "alexnet", "vgg16", "resnet18")


def check_width(name: str) -> None:
    """Refuse a model that has no ``width`` option (no narrower copy of it can be built)."""
    if name not in WIDTH_MODELS:
        raise ConfigError(f"model {name} has no width option, so no dense student of a given "
                          f"size can be built from it; the kd baselines take "
                          f"{', '.join(WIDTH_MODELS)}")


def width_for_budget(name: str, kwargs: dict, budget: int) -> float:
    """The widest ``width`` (to 1e-3) whose model has at most ``budget`` Conv/Linear weights:
    the dense student that is as large as a sparse model keeping ``budget`` weights."""
    check_width(name)
    lo, hi = 0.0, 1.0
    if weight_count(name, {**kwargs, "width": hi}) <= budget:
        return hi
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        if weight_count(name, {**kwargs, "width": mid}) <= budget:
            lo = mid
        else:
            hi = mid
    if lo == 0.0:
        raise ConfigError(f"even the narrowest {name} has more than {budget} weights; raise "
                          "--sparsity for the kd baselines")
    return lo
