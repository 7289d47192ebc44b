import math

import pytest
import torch
import torch.nn.functional as F

from sidpipe.method.loss import sid_loss, smoothed_onehot
from sidpipe.models.heads import sparse_prior, uniform_prior


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


def _coarse(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """p on the partition {each class in idx, the rest as one}: (rows, k + 1), by hand."""
    known = p.gather(-1, idx)
    return torch.cat([known, 1 - known.sum(-1, keepdim=True)], -1)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_partition_consistency_is_the_kl_of_the_coarse_beliefs(direction):
    """sent_k=k: the consistency term is the KL between the two beliefs on {each of the k
    sent classes, the rest}, computed here by hand on the (k + 1)-bin distributions."""
    torch.manual_seed(0)
    v, k = 12, 3
    z, y = torch.randn(6, v, dtype=torch.float64), torch.randint(0, v, (6,))
    prev = sparse_prior(torch.softmax(3 * torch.randn(6, v, dtype=torch.float64), -1), k)
    idx = prev.topk(k, -1).indices
    a, b = _coarse(prev, idx), _coarse(torch.softmax(z, -1), idx)
    kl = (a * (a / b).log()).sum(-1) if direction == "forward" else (b * (b / a).log()).sum(-1)
    got = sid_loss(z, y, prev, alpha=0.0, kl_direction=direction, sent_k=k)
    assert torch.allclose(got, kl.mean(), atol=1e-12)


def test_even_spread_kl_is_partition_kl_plus_a_push_to_a_flat_tail():
    """The chain rule of KL that motivates `partition` (method/loss.py): against the rebuilt
    prior, forward KL = partition KL + rest * KL(uniform over the tail || p's tail)."""
    torch.manual_seed(1)
    v, k = 10, 4
    z = torch.randn(5, v, dtype=torch.float64)
    prev = sparse_prior(torch.softmax(2 * torch.randn(5, v, dtype=torch.float64), -1), k)
    y = torch.zeros(5, dtype=torch.long)
    even = sid_loss(z, y, prev, alpha=0.0)
    part = sid_loss(z, y, prev, alpha=0.0, sent_k=k)
    idx = prev.topk(k, -1).indices
    tail = torch.softmax(z, -1).scatter(-1, idx, 0.0)
    tail = tail / tail.sum(-1, keepdim=True)
    rest = 1 - prev.gather(-1, idx).sum(-1)
    u = 1.0 / (v - k)
    push = (u * (u / tail.clamp_min(1e-300)).log() * (tail > 0)).sum(-1)
    assert torch.allclose(even, part + (rest * push).mean(), atol=1e-12)
    assert float(even - part) > 0  # the push is real for this random tail


def test_partition_consistency_ignores_how_the_tail_is_shaped():
    """Reshaping p's tail (the classes that were not sent) at the same tail mass leaves the
    partition term unchanged: the message says nothing about that shape. The even-spread
    term rewards a flatter tail."""
    torch.manual_seed(2)
    v, k = 9, 3
    z = torch.randn(4, v, dtype=torch.float64)
    prev = sparse_prior(torch.softmax(2 * torch.randn(4, v, dtype=torch.float64), -1), k)
    y = torch.zeros(4, dtype=torch.long)
    sent = torch.zeros(4, v, dtype=torch.bool).scatter(-1, prev.topk(k, -1).indices, True)
    q = torch.softmax(z, -1)
    mass = q.masked_fill(sent, 0).sum(-1, keepdim=True)
    peaked = torch.softmax((3 * z).masked_fill(sent, float("-inf")), -1) * mass
    z2 = torch.where(sent, q, peaked).log()  # same sent values, same tail mass, peakier tail
    part = [sid_loss(t, y, prev, alpha=0.0, sent_k=k) for t in (z, z2)]
    even = [sid_loss(t, y, prev, alpha=0.0) for t in (z, z2)]
    assert torch.allclose(part[0], part[1], atol=1e-12)
    assert float(even[1] - even[0]) > 1e-3
