import pytest
import torch
from torch import nn

from sidpipe.config import HEAD_KINDS, ModelConfig
from sidpipe.errors import ConfigError
from sidpipe.models import build_model
from sidpipe.models.heads import (
    BeliefHead,
    ConvBeliefHead,
    SpatialBeliefHead,
    make_head,
    uniform_prior,
)

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


# ----------------------------------------------------------------- spatial and conv heads

CONV_KINDS = ["spatial", "conv"]


@pytest.mark.parametrize("kind", CONV_KINDS)
@pytest.mark.parametrize("shape", [(4, 32, 32), (6, 8, 8), (8, 1, 1)], ids=["32px", "8px", "1px"])
@pytest.mark.parametrize("hidden", [0, 8])
def test_conv_heads_give_logits_for_any_map_size(kind, shape, hidden):
    torch.manual_seed(0)
    head = make_head(kind, shape, num_classes=3, hidden=hidden, width=5)
    z = head(torch.randn(2, *shape), uniform_prior(2, 3))
    assert z.shape == (2, 3) and torch.isfinite(z).all()
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    # the convs run at max(C, head_width) channels
    assert convs and all(c.out_channels == max(shape[0], 5) for c in convs)


def test_spatial_head_reduces_to_a_quarter_within_2_to_8():
    for hw, reduced in [(32, 8), (64, 8), (16, 4), (4, 2), (2, 2), (13, 3), (7, 2)]:
        head = SpatialBeliefHead((3, hw, hw), num_classes=2, hidden=0, width=4)
        assert head.reduced == (reduced, reduced)
        x = torch.randn(2, 3, hw, hw)
        first, last = head.features[0], head.features[-2]  # the pools around the 1x1 convs
        assert torch.allclose(first(x), nn.functional.adaptive_avg_pool2d(x, reduced))
        mid = torch.randn(2, 4, reduced, reduced)
        assert torch.allclose(last(mid), nn.functional.adaptive_avg_pool2d(mid, 2))
        assert head.out.in_features == 4 * 4 + 2  # 2x2 of 4 channels, then the belief


def test_spatial_head_does_not_pool_up_a_map_smaller_than_2x2():
    head = SpatialBeliefHead((3, 1, 5), num_classes=2, hidden=0, width=4)
    assert head.reduced == (1, 2) and head.kept == (1, 2)
    assert head.out.in_features == 4 * 2 + 2


def test_spatial_head_keeps_where_a_feature_fired():
    # two maps with the same channel means but mass in different corners: the pool head
    # cannot tell them apart, the spatial head can
    a = torch.zeros(1, 2, 8, 8)
    a[0, :, :4, :4] = 1.0
    b = a.flip(-1).flip(-2)
    p = uniform_prior(1, 2)
    torch.manual_seed(0)
    pool = make_head("pool", (2, 8, 8), 2, hidden=16)
    spatial = make_head("spatial", (2, 8, 8), 2, hidden=16, width=16)
    pool.eval(), spatial.eval()
    assert torch.equal(pool(a, p), pool(b, p))
    assert not torch.equal(spatial(a, p), spatial(b, p))


def test_conv_head_is_a_strided_3x3():
    head = ConvBeliefHead((4, 9, 9), num_classes=3, hidden=6, width=2)
    conv = head.features[0]
    assert conv.kernel_size == (3, 3) and conv.stride == (2, 2) and conv.out_channels == 4
    assert head.out.in_features == 6 + 3  # FC(hidden) then the belief, then FC to K


@pytest.mark.parametrize("kind", CONV_KINDS)
def test_batchnorm_in_heads_follows_train_and_eval(kind):
    # train mode normalises over the batch and moves the running statistics; eval mode uses
    # them and is a per-sample function (a sample's logits do not depend on its batch)
    torch.manual_seed(0)
    head = make_head(kind, (3, 8, 8), num_classes=4, hidden=8, width=4)
    bn = next(m for m in head.modules() if isinstance(m, nn.BatchNorm2d))
    h, p = torch.randn(6, 3, 8, 8) * 3 + 1, uniform_prior(6, 4)
    before = bn.running_mean.clone()
    head.train()
    train_out = head(h, p)
    assert not torch.equal(bn.running_mean, before)
    assert not torch.allclose(head(h[:3], p[:3]), train_out[:3])  # depends on the batch
    head.eval()
    frozen = bn.running_mean.clone()
    eval_out = head(h, p)
    assert torch.equal(bn.running_mean, frozen)
    assert torch.allclose(head(h[:3], p[:3]), eval_out[:3], atol=1e-6)
    assert not torch.allclose(eval_out, train_out)


@pytest.mark.parametrize("kind", CONV_KINDS)
@pytest.mark.parametrize("shape", [(6, 12), (20,)], ids=["tokens", "vector"])
def test_conv_heads_refuse_vector_features_in_one_line(kind, shape):
    with pytest.raises(ConfigError, match=f"model.head={kind} needs convnet features") as e:
        make_head(kind, shape, num_classes=3, where="model=custom block 2 of 3")
    assert "model=custom block 2 of 3" in str(e.value) and "\n" not in str(e.value)


def test_unknown_head_kind():
    with pytest.raises(ConfigError, match="model.head='wide' is unknown"):
        make_head("wide", (3, 4, 4), num_classes=2)


@pytest.mark.parametrize("model", ["mlp", "vit_tiny", "gpt"])
def test_config_refuses_conv_heads_for_vector_models(model):
    with pytest.raises(ConfigError, match=f"model={model}'s blocks give vectors"):
        ModelConfig(name=model, head="spatial")
    assert ModelConfig(name=model, head="pool").head == "pool"


@pytest.mark.parametrize("bad", [{"head": "Spatial"}, {"head_width": 0}])
def test_config_refuses_bad_head_keys(bad):
    with pytest.raises(ConfigError, match=f"model.{next(iter(bad))}"):
        ModelConfig(name="resnet18", **bad)


@pytest.mark.parametrize("model", ["simplecnn", "vgg11", "resnet18"])
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_zoo_convnets_take_every_head(model, kind):
    torch.manual_seed(0)
    cfg = ModelConfig(name=model, width=4, blocks=3, head=kind, head_width=4, head_hidden=8)
    net = build_model(cfg, (3, 16, 16), num_classes=5)
    kinds = {"pool": BeliefHead, "spatial": SpatialBeliefHead, "conv": ConvBeliefHead}
    assert all(type(h) is kinds[kind] for h in net.heads)
    assert [z.shape for z in net(torch.randn(2, 3, 16, 16))] == [(2, 5)] * 3
