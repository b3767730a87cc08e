import math

import torch

from compressor.regularizers import REGULARIZERS, entropy


def test_entropy_matches_hand_computation():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert math.isclose(float(entropy(logits)), 1.5 * math.log(2), rel_tol=1e-6)


def test_re1_and_re2_against_hand_values():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]))
    labels = torch.tensor([0, 2, 2])  # the second sample is misclassified
    ce = -(math.log(0.7) + math.log(0.3) + math.log(0.8)) / 3
    h = [-sum(p * math.log(p) for p in row) for row in ([0.7, 0.2, 0.1], [0.2, 0.5, 0.3],
                                                         [0.1, 0.1, 0.8])]
    beta = 0.1
    assert math.isclose(float(REGULARIZERS.get("none")(logits, labels, beta)), ce, rel_tol=1e-5)
    assert math.isclose(float(REGULARIZERS.get("re1")(logits, labels, beta)),
                        ce - beta * sum(h) / 3, rel_tol=1e-5)
    assert math.isclose(float(REGULARIZERS.get("re2")(logits, labels, beta)),
                        ce - beta * h[1], rel_tol=1e-5)


def test_re2_is_plain_ce_without_misclassified_samples_and_never_nan():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    loss = REGULARIZERS.get("re2")(logits, labels, 0.1)
    assert not torch.isnan(loss)
    plain = REGULARIZERS.get("none")(logits, labels, 0.1)
    assert math.isclose(float(loss.detach()), float(plain.detach()))
    loss.backward()
    assert not torch.isnan(logits.grad).any()
