"""Single-process trainers: locality of blockwise SID, the shared variant against a literal
re-statement of the reference algorithm, and short real training runs (in this process)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from sidpipe.config import Config, DataConfig, ModelConfig, SIDConfig, Variant
from sidpipe.data import load_data
from sidpipe.method.step import BlockwiseSID, SharedSID
from sidpipe.models import build_model
from sidpipe.models.shared import SharedSIDNet
from tests.conftest import read_summary
from tests.conftest import train_in_process as train


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_blockwise_module_loss_reaches_only_its_block_and_head():
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(name="mlp", width=32, depth=4))
    net = build_model(cfg.model, (1, 8, 8), 10)
    method = BlockwiseSID(cfg, net, total=10, device=torch.device("cpu"))
    x, y = _batch()
    p0 = torch.full((16, 10), 0.1)
    _, _, losses, _ = method.learner.forward(x, p0, y)
    for i, loss in enumerate(losses):
        net.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        for j in range(net.n_blocks):
            touched = [
                p.grad is not None and p.grad.abs().sum() > 0
                for m in (net.blocks[j], net.heads[j])
                for p in m.parameters()
            ]
            if j == i:
                assert all(touched), f"loss {i} must train all of block+head {i}"
            else:
                assert not any(touched), f"loss {i} leaked a gradient into module {j}"


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_batchnorm_across_local_modules(name):
    """Each module's BatchNorm layers see one training forward per batch (running statistics
    move once), and evaluation uses those running statistics: it changes nothing and does
    not depend on the rest of the batch."""
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(name=name, width=4, blocks=4))
    net = build_model(cfg.model, (3, 16, 16), 10)
    method = BlockwiseSID(cfg, net, total=10, device=torch.device("cpu"))
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for step in (1, 2):
        method.step(x, y)
        assert all(int(m.num_batches_tracked) == step for m in bns)
    before = [m.running_mean.clone() for m in bns]
    whole = method.logits(x)
    alone = method.logits(x[:1])  # one sample: batch statistics would differ from the batch's
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bns, before, strict=True))
    assert all(int(m.num_batches_tracked) == 2 for m in bns)
    for z_whole, z_alone in zip(whole, alone, strict=True):
        assert torch.allclose(z_whole[:1], z_alone, atol=1e-5)


def test_blockwise_step_changes_only_updated_modules():
    """One real step: every module moves; each module's new parameters depend only on its own
    loss (re-running with another module's head perturbed leaves them unchanged)."""
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(name="mlp", width=32, depth=3))
    x, y = _batch()

    def one_step(perturb_last_head: bool):
        torch.manual_seed(0)
        net = build_model(cfg.model, (1, 8, 8), 10)
        if perturb_last_head:
            with torch.no_grad():
                for p in net.heads[2].parameters():
                    p.add_(1.0)
        before = copy.deepcopy(net.state_dict())
        BlockwiseSID(cfg, net, 10, torch.device("cpu")).step(x, y)
        return before, net.state_dict()

    before, after = one_step(False)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    _, after_perturbed = one_step(True)
    for k in after:
        if k.startswith(("blocks.0.", "heads.0.", "blocks.1.", "heads.1.")):
            assert torch.equal(after[k], after_perturbed[k]), k


def _reference_optimizers(net: SharedSIDNet, lr: float) -> list[torch.optim.Optimizer]:
    """One Adam for the extractor and one per module, as in the reference code."""
    opts = [torch.optim.Adam(net.extractor.parameters(), lr=lr)]
    return opts + [torch.optim.Adam(m.parameters(), lr=lr) for m in net.sid_modules]


def _reference_step(net: SharedSIDNet, opts, x, y, alpha):
    """A literal re-statement of the reference algorithm (two phases, detached teacher
    beliefs, summed losses)."""
    for o in opts:
        o.zero_grad()
    feats = net.extractor(x)
    onehot = F.one_hot(y, 10).float()
    with torch.no_grad():
        p = torch.full((x.shape[0], 10), 0.1)
        teachers = [p]
        for m in net.sid_modules:
            p = F.softmax(m(torch.cat((p, feats.detach()), 1)), 1)
            teachers.append(p)
    total = 0
    for i, m in enumerate(net.sid_modules):
        log_p = F.log_softmax(m(torch.cat((teachers[i], feats), 1)), 1)
        total = (
            total
            + alpha * F.kl_div(log_p, onehot, reduction="batchmean")
            + (1 - alpha) * F.kl_div(log_p, teachers[i], reduction="batchmean")
        )
    total.backward()
    for o in opts:
        o.step()


@pytest.fixture
def float64():
    """Double precision: both sides then agree to ~1e-12 instead of Adam-amplified fp32 noise."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_shared_step_equals_reference_restatement(alpha, float64):
    x, y = _batch(8, seed=1)
    x = x.double()
    torch.manual_seed(3)
    ours = SharedSIDNet((1, 8, 8), 10, n_modules=3)
    ref = copy.deepcopy(ours)
    cfg = Config(sid=SIDConfig(variant=Variant.shared, alpha=alpha, modules=3))
    method = SharedSID(cfg, ours, total=10, device=torch.device("cpu"))
    ref_opts = _reference_optimizers(ref, cfg.optim.lr)
    for _ in range(2):  # two steps: Adam state carried over too
        method.step(x, y)
        _reference_step(ref, ref_opts, x, y, alpha)
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (k, (a - b).abs().max())
    torch.manual_seed(3)
    init = SharedSIDNet((1, 8, 8), 10, n_modules=3)
    assert not torch.equal(ours.sid_modules[0][0].weight, init.sid_modules[0][0].weight)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("sid blockwise", ["train.epochs=6"]),
        ("sid shared", ["sid.variant=shared", "train.epochs=12"]),
        ("bp", ["method=bp", "train.epochs=6"]),
    ],
)
def test_digits_smoke_reaches_093(name, overrides, tmp_path, caplog):
    """What `sidpipe train` runs at S=1, in this process (the CLI itself: tests/test_cli.py)."""
    with caplog.at_level("INFO", logger="sidpipe"):
        train(["pipeline.stages=1", "progress=false", *overrides], tmp_path)
    s = read_summary(tmp_path)
    assert s["test_accuracy"] >= 0.93, f"{name}: {s['test_accuracy']}"
    for key in (
        "method",
        "variant",
        "stages",
        "test_accuracy",
        "per_depth_accuracy",
        "samples_per_s",
        "wall_s",
        "per_stage",
    ):
        assert key in s
    for st in s["per_stage"]:
        for key in (
            "busy_fraction",
            "bytes_sent_forward",
            "bytes_sent_backward",
            "peak_memory_bytes",
        ):
            assert key in st
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(rec["kind"] == "train" for rec in lines) and any(
        rec["kind"] == "eval" for rec in lines
    )
    if name == "bp":
        assert len(s["per_depth_accuracy"]) == 1
    assert "test accuracy" in caplog.text


def test_validation_split_selects_epoch(tmp_path):
    train(["pipeline.stages=1", "progress=false", "train.epochs=3", "data.val_fraction=0.2"],
          tmp_path)  # fmt: skip
    s = read_summary(tmp_path)
    assert 0 <= s["val_selected_epoch"] < 3 and 0 < s["val_accuracy"] <= 1
    assert s["best_epoch_test_accuracy"] >= s["val_selected_test_accuracy"]


def test_label_noise_rate_in_summary(tmp_path):
    data = load_data(DataConfig(name="digits", label_noise=0.2), 0)
    train(["pipeline.stages=1", "progress=false", "train.epochs=1", "data.label_noise=0.2"],
          tmp_path)  # fmt: skip
    assert read_summary(tmp_path)["label_noise_rate"] == pytest.approx(data.noise_rate)
    assert 0.15 < data.noise_rate < 0.25
