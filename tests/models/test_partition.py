from types import SimpleNamespace

import pytest
import torch

from sidpipe.models import build_model
from sidpipe.models.partition import Stage, partition_blocks, stage_modules

torch.set_num_threads(1)


def cfg(name, blocks=None, depth=4):
    # narrow models keep the tests fast: 16 hidden units or first-stage channels, the ViT 24
    width = 24 if name == "vit_tiny" else 16
    return SimpleNamespace(name=name, blocks=blocks, width=width, depth=depth, head_hidden=8)


# ---- partition_blocks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, s, sizes",
    [
        (4, 1, [4]),
        (4, 2, [2, 2]),
        (5, 2, [3, 2]),
        (8, 3, [3, 3, 2]),
        (12, 5, [3, 3, 2, 2, 2]),
        (4, 4, [1, 1, 1, 1]),
    ],
)
def test_uniform(n, s, sizes):
    ranges = partition_blocks(n, s)
    assert [len(r) for r in ranges] == sizes
    assert [i for r in ranges for i in r] == list(range(n))  # contiguous, complete, ordered


def test_cuts_override():
    assert partition_blocks(8, 3, [1, 7]) == [range(0, 1), range(1, 7), range(7, 8)]
    assert partition_blocks(4, 1, []) == [range(0, 4)]
    assert partition_blocks(4, 2, (3,)) == [range(0, 3), range(3, 4)]


def test_errors():
    with pytest.raises(ValueError, match=r"^pipeline\.stages must be >= 1 \(got 0\)$"):
        partition_blocks(4, 0)
    with pytest.raises(
        ValueError,
        match=r"^pipeline\.stages=5 exceeds the model's 4 blocks; "
        r"lower pipeline\.stages or raise model\.blocks$",
    ):
        partition_blocks(4, 5)
    msg = (
        r"^pipeline\.partition=\[3, 2\] must list 1 strictly increasing cut points in 1\.\.3 "
        r"\(pipeline\.stages=2, 4 blocks\)$"
    )
    with pytest.raises(ValueError, match=msg):
        partition_blocks(4, 2, [3, 2])
    for bad in ([], [0], [4], [2, 3], [1.5]):
        with pytest.raises(ValueError, match=r"pipeline\.partition="):
            partition_blocks(4, 2, bad)
    with pytest.raises(ValueError, match=r"pipeline\.partition=\[2, 2\] must list 2"):
        partition_blocks(4, 3, [2, 2])


# ---- stage modules compose to the uncut network -----------------------------------------


def run_sid(stages, x):
    h, p, logits = x, None, []
    for st in stages:
        h, p, lg = st(h, p)
        logits.extend(lg)
    return logits


def run_bp(stages, x):
    h = x
    for st in stages:
        h = st.bp_forward(h)
    return h


CASES = [
    ("mlp", (1, 8, 8), None),  # None: every S in 1..n_blocks
    ("simplecnn", (1, 8, 8), None),
    ("simplecnn", (3, 32, 32), [2, 4]),
    ("vgg11", (1, 8, 8), [2, 3, 8]),
    ("resnet18", (1, 8, 8), [2, 5, 8]),
    ("vit_tiny", (1, 8, 8), [2, 5, 12]),
]


@pytest.mark.parametrize("name, in_shape, stage_counts", CASES, ids=lambda v: str(v))
def test_composition_equals_uncut(name, in_shape, stage_counts):
    torch.manual_seed(0)
    net = build_model(cfg(name), in_shape, num_classes=5)
    x = torch.randn(3, *in_shape)
    with torch.no_grad():
        want_sid = net(x)
        want_bp = net.bp_forward(x)
        for s in stage_counts or range(1, net.n_blocks + 1):
            stages = stage_modules(net, s)
            assert len(stages) == s
            got = run_sid(stages, x)
            assert len(got) == net.n_blocks
            assert all(torch.equal(a, b) for a, b in zip(got, want_sid, strict=True))
            assert torch.equal(run_bp(stages, x), want_bp)


def test_composition_with_cuts_and_regrouped_blocks():
    torch.manual_seed(0)
    net = build_model(cfg("mlp", blocks=5, depth=7), (1, 8, 8), num_classes=4)
    x = torch.randn(2, 1, 8, 8)
    stages = stage_modules(net, 3, cuts=[1, 4])
    assert [(st.first, st.stop) for st in stages] == [(0, 1), (1, 4), (4, 5)]
    assert [st.in_shape for st in stages] == [(1, 8, 8), (16,), (16,)]
    assert [st.is_first for st in stages] == [True, False, False]
    assert [st.is_last for st in stages] == [False, False, True]
    assert all(torch.equal(a, b) for a, b in zip(run_sid(stages, x), net(x), strict=True))
    assert torch.equal(run_bp(stages, x), net.bp_forward(x))


def test_stage_shares_parameters():
    net = build_model(cfg("simplecnn"), (1, 8, 8), num_classes=3)
    st = Stage(net, range(1, 3))
    assert st.blocks[0] is net.blocks[1] and st.heads[1] is net.heads[2]
    net_params = {id(p) for p in net.parameters()}
    assert {id(p) for p in st.parameters()} <= net_params
    assert st.first == 1 and st.block_range == range(1, 3)
    with pytest.raises(ValueError):
        Stage(net, range(3, 5))
    with pytest.raises(ValueError, match=r"pipeline\.stages=5 exceeds"):
        stage_modules(net, 5)
