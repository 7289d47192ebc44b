import math

import pytest
import torch
import torch.nn.functional as F

from sidpipe.method.loss import sid_loss, smoothed_onehot
from sidpipe.models.heads import uniform_prior


def test_uniform_prior():
    p = uniform_prior(3, 4)
    assert p.shape == (3, 4)
    assert torch.allclose(p.sum(-1), torch.ones(3))
    assert torch.all(p == 0.25)


def test_forward_kl_to_onehot_equals_cross_entropy():
    torch.manual_seed(0)
    z, y = torch.randn(5, 7), torch.randint(0, 7, (5,))
    onehot = F.one_hot(y, 7).float()
    kl = F.kl_div(F.log_softmax(z, -1), onehot, reduction="batchmean")
    assert torch.allclose(kl, F.cross_entropy(z, y), atol=1e-6)
    # alpha=1 keeps only the label term
    assert torch.allclose(sid_loss(z, y, uniform_prior(5, 7), alpha=1.0), F.cross_entropy(z, y))


def test_hand_computed_two_class_value():
    # z = [0, 0] -> p = [.5, .5]; y = 0; prev = [.8, .2]
    z = torch.zeros(1, 2)
    y = torch.tensor([0])
    prev = torch.tensor([[0.8, 0.2]])
    ce = math.log(2)
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    got = sid_loss(z, y, prev, alpha=0.3)
    assert got.item() == pytest.approx(0.3 * ce + 0.7 * kl, rel=1e-6)
    # reverse: KL(p || prev) and KL(p || smoothed onehot)
    s = 0.1
    q = [1 - s + s / 2, s / 2]
    rev_label = 0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1])
    rev_prev = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    got = sid_loss(z, y, prev, alpha=0.3, kl_direction="reverse", label_smoothing=s)
    assert got.item() == pytest.approx(0.3 * rev_label + 0.7 * rev_prev, rel=1e-5)


def test_label_smoothing_matches_torch_cross_entropy():
    torch.manual_seed(1)
    z, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    got = sid_loss(z, y, uniform_prior(4, 5), alpha=1.0, label_smoothing=0.2)
    assert torch.allclose(got, F.cross_entropy(z, y, label_smoothing=0.2))
    q = smoothed_onehot(y, 5, 0.2)
    assert torch.allclose(q.sum(-1), torch.ones(4))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_finite_when_beliefs_have_zeros(direction):
    z = torch.tensor([[50.0, -50.0, 0.0]], requires_grad=True)
    prev = torch.tensor([[1.0, 0.0, 0.0]])  # exact zeros in the previous belief
    loss = sid_loss(z, torch.tensor([0]), prev, alpha=0.5, kl_direction=direction)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z.grad).all()


def test_prev_belief_gets_no_gradient():
    z = torch.randn(2, 3, requires_grad=True)
    prev = torch.softmax(torch.randn(2, 3), -1).requires_grad_()  # a leaf that could get .grad
    sid_loss(z, torch.tensor([0, 1]), prev).backward()
    assert prev.grad is None  # stop-gradient on the teacher belief


def test_unknown_direction():
    with pytest.raises(ValueError, match="sid.kl_direction"):
        sid_loss(
            torch.zeros(1, 2), torch.tensor([0]), torch.full((1, 2), 0.5), kl_direction="sideways"
        )
