import torch

from compressor.strategies import (
    GROW,
    PRUNE,
    grow_gradient,
    grow_random,
    prune_count,
    prune_magnitude,
    prune_threshold,
)


def test_registries_hold_the_paper_strategies():
    assert PRUNE.names() == ["magnitude", "threshold"]
    assert GROW.names() == ["gradient", "random"]


def test_magnitude_prune_removes_the_smallest_active_per_layer():
    w = torch.tensor([[0.1, -0.5, 0.3, 2.0], [-0.05, 0.9, 0.0, 0.2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    (out,) = prune_magnitude([w], [mask], 0.5)  # 7 active -> round(3.5) = 4 removed
    assert int(mask.sum()) - int(out.sum()) == prune_count(mask, 0.5) == 4
    assert out.tolist() == [[False, True, False, True], [False, True, False, False]]


def test_threshold_prune_is_global_with_the_same_total():
    small = torch.full((4, 4), 0.01) + torch.arange(16).view(4, 4) * 1e-4
    large = torch.full((4, 4), 1.0) + torch.arange(16).view(4, 4) * 1e-3
    masks = [torch.ones(4, 4, dtype=torch.bool)] * 2
    out = prune_threshold([small, large], masks, 0.25)
    removed = [16 - int(m.sum()) for m in out]
    assert sum(removed) == 8  # same total as magnitude pruning (4 + 4)
    assert removed == [8, 0]  # ... but all taken from the layer of small weights
    mag = prune_magnitude([small, large], masks, 0.25)
    assert [16 - int(m.sum()) for m in mag] == [4, 4]


def test_gradient_grow_picks_the_largest_gradients_among_inactive():
    mask = torch.tensor([True, False, False, False, False, True])
    grad = torch.tensor([9.0, 0.1, -5.0, 0.2, 3.0, 8.0])
    out = grow_gradient(None, grad, mask, 2, torch.Generator())
    assert out.tolist() == [True, False, True, False, True, True]


def test_random_grow_exact_count_only_inactive_and_seeded():
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[:100] = True
    a = grow_random(None, None, mask, 250, torch.Generator().manual_seed(3))
    b = grow_random(None, None, mask, 250, torch.Generator().manual_seed(3))
    assert int(a.sum()) == 350 and a[:100].all()
    assert torch.equal(a, b)


def test_prune_then_grow_keeps_every_layer_count():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(20, 10), torch.randn(8, 4, 3, 3)]
    masks = [torch.rand(w.shape, generator=g) < 0.3 for w in weights]
    grads = [torch.randn(w.shape) for w in weights]
    for prune in PRUNE.names():
        pruned = PRUNE.get(prune)(weights, masks, 0.4)
        for grow in GROW.names():
            grown = [GROW.get(grow)(w, gr, pm, int(m.sum()) - int(pm.sum()), g)
                     for w, gr, m, pm in zip(weights, grads, masks, pruned, strict=True)]
            assert [int(m.sum()) for m in grown] == [int(m.sum()) for m in masks]
