from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sidpipe.config import LANGUAGE_MODELS, MODEL_NAMES, compose_config
from sidpipe.errors import ConfigError
from sidpipe.models import BlockNet, SharedSIDNet, build_model, natural_layers
from sidpipe.models.vit import patch_size_for

# the image zoo; custom: tests/models/test_custom.py, language models (gpt): tests/test_lm.py
ZOO = tuple(n for n in MODEL_NAMES if n != "custom" and n not in LANGUAGE_MODELS)

torch.set_num_threads(1)

NATURAL = {"mlp": 4, "simplecnn": 4, "vgg11": 8, "resnet18": 8, "vit_tiny": 12}
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def cfg(name, blocks=None, width=None, depth=4, head_hidden=16):
    return SimpleNamespace(
        name=name, blocks=blocks, width=width, depth=depth, head_hidden=head_hidden
    )


def real_block_shapes(net: BlockNet, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes, h = [], x
    for block in net.blocks:
        h = block(h)
        shapes.append(tuple(h.shape[1:]))
    return shapes


def test_names():
    assert ZOO == ("mlp", "simplecnn", "vgg11", "resnet18", "vit_tiny")


@pytest.mark.parametrize("in_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ZOO)
def test_build_and_forward(name, in_shape):
    torch.manual_seed(0)
    net = build_model(cfg(name), in_shape, num_classes=7)
    assert net.n_blocks == NATURAL[name] == len(net.heads)
    assert net.in_shape == in_shape and net.num_classes == 7
    x = torch.randn(2, *in_shape)
    out = net(x)
    assert isinstance(out, list) and len(out) == net.n_blocks
    assert all(z.shape == (2, 7) for z in out)
    assert net.bp_forward(x).shape == (2, 7)
    assert net.block_shapes() == real_block_shapes(net, x)


@pytest.mark.parametrize("name", ZOO)
def test_blocks_grouping(name):
    n = NATURAL[name]
    for blocks in sorted({1, 3, n}):
        net = build_model(cfg(name, blocks=blocks), (1, 8, 8), num_classes=3)
        assert net.n_blocks == blocks
        sizes = [len(b) for b in net.blocks]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # earlier blocks take the extra layer
        assert all(isinstance(b, nn.Sequential) for b in net.blocks)
        assert len(net(torch.randn(2, 1, 8, 8))) == blocks
    for bad in (0, n + 1):
        with pytest.raises(ValueError, match=rf"model\.blocks={bad} .*{n} natural layers"):
            build_model(cfg(name, blocks=bad), (1, 8, 8), num_classes=3)


def test_mlp_depth_width():
    net = build_model(cfg("mlp", depth=6, width=24), (3, 5, 2), num_classes=4)
    assert net.n_blocks == 6
    assert net.block_shapes() == [(24,)] * 6
    assert net.blocks[0][0][1].in_features == 30  # flattens prod(in_shape)
    assert net(torch.randn(2, 3, 5, 2))[-1].shape == (2, 4)


def test_unknown_name():
    msg = "model.name='xyz' is unknown; choose one of " + ", ".join(MODEL_NAMES)
    with pytest.raises(ValueError, match="^" + msg.replace(".", r"\.") + "$"):
        build_model(cfg("xyz"), (1, 8, 8), num_classes=3)


@pytest.mark.parametrize("name", ZOO)
def test_deterministic_init(name):
    torch.manual_seed(3)
    a = build_model(cfg(name), (1, 8, 8), num_classes=3).state_dict()
    torch.manual_seed(3)
    b = build_model(cfg(name), (1, 8, 8), num_classes=3).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shape_probe_leaves_state_alone():
    net = build_model(cfg("vgg11"), (1, 8, 8), num_classes=3)
    assert all(m.training for m in net.modules())
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(int(m.num_batches_tracked) == 0 for m in bns)
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bns)


def test_architecture_details():
    layers = natural_layers(cfg("simplecnn"), (3, 32, 32))
    convs = [m for m in nn.Sequential(*layers).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128]
    pools = [any(isinstance(m, nn.MaxPool2d) for m in layer) for layer in layers]
    assert pools == [False, True, False, True]

    vgg = natural_layers(cfg("vgg11"), (3, 32, 32))
    assert [layer[0].out_channels for layer in vgg] == [64, 128, 256, 256, 512, 512, 512, 512]

    res = build_model(cfg("resnet18"), (3, 32, 32), num_classes=10)
    assert [s[0] for s in res.block_shapes()] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert not any(isinstance(m, nn.MaxPool2d) for m in res.modules())

    vit = build_model(cfg("vit_tiny"), (3, 32, 32), num_classes=10)
    assert vit.block_shapes() == [(64, 192)] * 12
    assert patch_size_for(28, 28) == 4 and patch_size_for(30, 30) == 3
    assert patch_size_for(14, 14) == 2
    assert patch_size_for(7, 7) == 1 and patch_size_for(8, 12) == 4


def test_width_scales_every_architecture():
    """model.width is the first stage's channels (conv nets) or the embedding dim (ViT); the
    later stages keep the standard ratios."""
    res = build_model(cfg("resnet18", width=8), (3, 32, 32), num_classes=10)
    assert [s[0] for s in res.block_shapes()] == [8, 8, 16, 16, 32, 32, 64, 64]
    vgg = natural_layers(cfg("vgg11", width=16), (3, 32, 32))
    assert [layer[0].out_channels for layer in vgg] == [16, 32, 64, 64, 128, 128, 128, 128]
    cnn = natural_layers(cfg("simplecnn", width=8), (3, 32, 32))
    assert [layer[0].out_channels for layer in cnn] == [8, 16, 32, 32]
    vit = build_model(cfg("vit_tiny", width=48), (3, 32, 32), num_classes=10)
    assert vit.block_shapes() == [(64, 48)] * 12
    small = sum(p.numel() for p in res.parameters())
    full = sum(p.numel() for p in build_model(cfg("resnet18"), (3, 32, 32), 10).parameters())
    assert small < full / 20  # conv parameters shrink with width squared


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=vit_tiny", "model.width=100"], "multiple of vit_tiny's 3 attention heads"),
        (["model=resnet18", "model.width=0"], "model.width must be >= 1"),
        (["model=custom", "model.target=a:b", "model.width=8"], "pass it in model.kwargs"),
    ],
)
def test_width_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


def test_tiny_spatial_inputs_skip_pools():
    for name in ("simplecnn", "vgg11"):
        net = build_model(cfg(name), (1, 3, 3), num_classes=2)
        assert net.block_shapes()[-1][1:] == (1, 1)
        assert net(torch.randn(2, 1, 3, 3))[-1].shape == (2, 2)


# ---- the shared (reference) variant ----------------------------------------------------


def test_shared_shapes_and_count():
    torch.manual_seed(0)
    net = SharedSIDNet((1, 8, 8), num_classes=10, n_modules=3, feat_dim=32, hidden=64)
    assert net.n_modules == len(net.sid_modules) == 3
    x = torch.randn(2, 1, 8, 8)
    z = net.extractor(x)
    assert z.shape == (2, 32)
    out = net(x)
    assert len(out) == 3 and all(o.shape == (2, 10) for o in out)
    assert torch.equal(net.bp_forward(x), out[-1])
    g = net.sid_modules[0]
    assert [type(m) for m in g] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (g[0].in_features, g[0].out_features, g[2].out_features) == (42, 64, 10)
    # module input is cat(p_prev, z), belief first (as in the reference code)
    p = torch.full((2, 10), 0.1)
    assert torch.equal(out[0], g(torch.cat((p, z), dim=1)))
    rgb = SharedSIDNet((3, 32, 32), num_classes=100, n_modules=8)
    assert [o.shape for o in rgb(torch.randn(2, 3, 32, 32))] == [(2, 100)] * 8


def test_shared_defaults_match_reference_init_order():
    # A re-statement of the reference network's parameter creation order (extractor convs,
    # extractor Linear, then each module's two Linears): same seed -> same initial values.
    torch.manual_seed(0)
    ref = nn.ModuleList(
        [
            nn.Conv2d(1, 32, 3, padding=1),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.Linear(128, 128),
        ]
        + [m for _ in range(5) for m in (nn.Linear(138, 256), nn.Linear(256, 10))]
    )
    torch.manual_seed(0)
    net = SharedSIDNet((1, 28, 28), num_classes=10)
    assert net.n_modules == 5
    ours = list(net.parameters())
    theirs = list(ref.parameters())
    assert len(ours) == len(theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert net(torch.randn(2, 1, 28, 28))[-1].shape == (2, 10)
