import math

import pytest
import torch
from torch import nn

from compressor.masking import Masking, erk_counts, init_masks, maskable


def test_erk_exact_global_density():
    shapes = [(32, 1, 3, 3), (64, 32, 3, 3), (128, 64, 3, 3), (128, 128), (10, 128)]
    total = sum(math.prod(s) for s in shapes)
    for density in (0.01, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0):
        counts = erk_counts(shapes, density)
        assert sum(counts) == round(density * total)
        assert all(0 < c <= math.prod(s) for c, s in zip(counts, shapes, strict=True))


def test_erk_follows_the_formula_and_solves_epsilon():
    # At a low density no layer saturates: density_k = eps * sum(dims)/prod(dims).
    shapes = [(64, 32, 3, 3), (128, 64, 3, 3), (256, 128)]
    counts = erk_counts(shapes, 0.02)
    raw = [sum(s) / math.prod(s) for s in shapes]
    eps = round(0.02 * sum(math.prod(s) for s in shapes)) / sum(
        r * math.prod(s) for r, s in zip(raw, shapes, strict=True))
    for c, s, r in zip(counts, shapes, raw, strict=True):
        assert abs(c - eps * r * math.prod(s)) <= 2  # rounding, settled on the largest layer


def test_erk_saturated_layer_becomes_dense_and_rest_resolved():
    # A tiny first layer (3x1x3x3) would get density > 1 at 0.5: it goes dense.
    shapes = [(3, 1, 3, 3), (256, 256, 3, 3)]
    counts = erk_counts(shapes, 0.5)
    assert counts[0] == 27
    assert sum(counts) == round(0.5 * (27 + 256 * 256 * 9))


def test_init_masks_exact_counts_and_magnitude_mode():
    w = [torch.randn(16, 8), torch.randn(8, 4, 3, 3)]
    counts = erk_counts([tuple(t.shape) for t in w], 0.3)
    masks = init_masks(w, 0.3, torch.Generator().manual_seed(0))
    assert [int(m.sum()) for m in masks] == counts
    mags = init_masks(w, 0.3, torch.Generator().manual_seed(0), by_magnitude=True)
    for t, m in zip(w, mags, strict=True):
        assert t.abs()[m].min() >= t.abs()[~m].max()


def test_maskable_skips_biases_norms_and_embeddings():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4),
                          nn.Linear(4, 2), nn.LayerNorm(2))
    assert [n for n, _ in maskable(model)] == ["1.weight", "3.weight"]


def test_masking_update_zeroes_grown_and_resets_optimizer_state():
    model = nn.Sequential(nn.Linear(6, 5))
    masking = Masking(model, init_masks([model[0].weight], 0.4, torch.Generator().manual_seed(1)))
    masking.apply()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 6)).sum().backward()
    masking.mask_grads()
    opt.step()
    masking.apply()
    old = masking.masks[0].clone()
    buf = opt.state[model[0].weight]["momentum_buffer"]
    assert (buf[~old] == 0).all()  # momentum never builds up at inactive positions
    new = old.clone()
    on, off = old.nonzero()[0], (~old).nonzero()[0]
    new[tuple(on)] = False
    new[tuple(off)] = True
    changed = masking.update([new], opt)
    assert changed == 2
    w = model[0].weight
    assert w[tuple(off)] == 0 and w[tuple(on)] == 0
    assert buf[tuple(on)] == 0 and buf[tuple(off)] == 0
    assert masking.counts() == [int(old.sum())]


def test_erk_rejects_bad_density():
    with pytest.raises(ValueError):
        erk_counts([(4, 4)], 0.0)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_train_state_clone_keeps_hyperparameters_and_state(name):
    from compressor.train import TrainState, make_optimizer

    model = nn.Linear(4, 3)
    opt = make_optimizer(model, name, 0.1, 0.9, 0.01)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    clone = TrainState(model, opt, None).clone()
    assert clone.optimizer.param_groups[0]["weight_decay"] == 0.01
    assert {k: v for k, v in clone.optimizer.param_groups[0].items() if k != "params"} == {
        k: v for k, v in opt.param_groups[0].items() if k != "params"}
    src = opt.state[model.weight]
    dst = clone.optimizer.state[clone.model.weight]
    assert src.keys() == dst.keys()
    assert all(torch.equal(src[k], dst[k]) for k in src if torch.is_tensor(src[k]))
    assert clone.model.weight.data_ptr() != model.weight.data_ptr()


def _layer_stds(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Standard deviation of every Linear layer's output on ``x``."""
    stds = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: stds.append(float(out.std())))
             for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return stds


@pytest.mark.parametrize("rescale", [True, False])
def test_sparse_initialisation_keeps_the_dense_activation_scale(rescale):
    # Nasr's MLP on 446 binary features, 30 classes, 5% of its weights kept (ERK): rescaled by
    # 1/sqrt(layer density), every layer's outputs keep the dense model's spread; without it
    # they collapse layer after layer (the MLP whose outputs are its biases and never learns).
    from safeexport.models.vision import MLP

    torch.manual_seed(0)
    dense = MLP(446, 30)
    sparse = MLP(446, 30)
    sparse.load_state_dict(dense.state_dict())
    weights = [p for _, p in maskable(sparse)]
    masking = Masking(sparse, init_masks(weights, 0.05, torch.Generator().manual_seed(1)))
    masking.apply()
    if rescale:
        masking.rescale_init()
    x = (torch.rand(512, 446, generator=torch.Generator().manual_seed(2)) < 0.2).float()
    ratios = [s / d for s, d in zip(_layer_stds(sparse, x), _layer_stds(dense, x), strict=True)]
    if rescale:
        assert all(0.8 < r < 1.25 for r in ratios), ratios
    else:
        assert min(ratios) < 0.3, ratios  # what the rescaling prevents
