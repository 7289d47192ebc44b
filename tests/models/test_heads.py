import pytest
import torch
from torch import nn

from sidpipe.models.heads import BeliefHead, uniform_prior

torch.set_num_threads(1)


def test_uniform_prior():
    p = uniform_prior(3, 4)
    assert p.shape == (3, 4) and p.dtype == torch.float32
    assert torch.equal(p, torch.full((3, 4), 0.25))
    assert uniform_prior(2, 5, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    "feature_shape, features",
    [((8, 4, 4), 8), ((6, 12), 12), ((20,), 20)],
    ids=["chw", "tokens", "vector"],
)
@pytest.mark.parametrize("hidden", [0, 16])
def test_head_shapes(feature_shape, features, hidden):
    torch.manual_seed(0)
    head = BeliefHead(feature_shape, num_classes=5, hidden=hidden)
    h = torch.randn(3, *feature_shape)
    z = head(h, uniform_prior(3, 5))
    assert z.shape == (3, 5)
    first = head.mlp if hidden == 0 else head.mlp[0]
    assert first.in_features == features + 5
    if hidden == 0:
        assert isinstance(head.mlp, nn.Linear)  # a single linear map
    else:
        assert [type(m) for m in head.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
        assert head.mlp[0].out_features == hidden


def test_pooling_semantics():
    # (C,H,W): global average pool; (N,D): LayerNorm then mean over tokens
    head = BeliefHead((4, 3, 3), num_classes=2, hidden=0)
    h = torch.randn(2, 4, 3, 3)
    p = uniform_prior(2, 2)
    expected = head.mlp(torch.cat((h.mean(dim=(2, 3)), p), dim=1))
    assert torch.allclose(head(h, p), expected)

    head = BeliefHead((5, 4), num_classes=2, hidden=0)
    t = torch.randn(2, 5, 4)
    pooled = nn.functional.layer_norm(t, (4,)).mean(dim=1)
    assert torch.allclose(head(t, p), head.mlp(torch.cat((pooled, p), dim=1)), atol=1e-6)


def test_gradient_reaches_prior():
    head = BeliefHead((6,), num_classes=3, hidden=8)
    prior = torch.softmax(torch.randn(2, 3), dim=1).requires_grad_()
    head(torch.randn(2, 6), prior).sum().backward()
    assert prior.grad is not None and prior.grad.abs().sum() > 0

    # detached prior: no gradient flows back into whatever produced it
    logits = torch.randn(2, 3, requires_grad=True)
    head(torch.randn(2, 6), torch.softmax(logits, dim=1).detach()).sum().backward()
    assert logits.grad is None


def test_bad_feature_rank():
    with pytest.raises(ValueError, match="BeliefHead supports"):
        BeliefHead((1, 2, 3, 4), num_classes=3)
