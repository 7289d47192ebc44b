"""Bring your own model: `model=custom model.target=...` with a model defined only here.

The in-process tests build and train it; the multi-process ones run it through the SID
pipeline (equal to the sequential trainer) and the BP pipeline, unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sidpipe.config import ModelConfig
from sidpipe.errors import ConfigError
from sidpipe.models import build_model
from sidpipe.models.heads import BeliefHead, ConvBeliefHead, SpatialBeliefHead
from sidpipe.runtime.io import load_state
from tests.conftest import TINY, read_summary, refusal, run_cli

TARGET = "tests.models.test_custom:make_layers"


class Residual(nn.Module):
    """Something the zoo does not have: a gated residual layer."""

    def __init__(self, width: int):
        super().__init__()
        self.fc, self.gate = nn.Linear(width, width), nn.Parameter(torch.zeros(width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.gate) * torch.relu(self.fc(h))


def make_layers(in_shape: tuple[int, ...], num_classes: int, width: int = 32, depth: int = 3):
    """A user's model: flatten + project, then `depth` gated residual layers."""
    n_in = 1
    for s in in_shape:
        n_in *= s
    first = nn.Sequential(nn.Flatten(), nn.Linear(n_in, width), nn.ReLU())
    return [first, *(Residual(width) for _ in range(depth))]


def not_layers(in_shape, num_classes):
    return "a string"


CUSTOM = ["model=custom", f"model.target={TARGET}", "+model.kwargs.width=24"]
# TINY without its mlp width: a custom model takes its sizes from model.kwargs only
BASE = [a for a in TINY if not a.startswith("model.width=")]


def test_custom_model_builds_with_heads_and_grouping():
    cfg = ModelConfig(name="custom", target=TARGET, kwargs={"width": 16, "depth": 5}, blocks=3)
    net = build_model(cfg, (1, 8, 8), num_classes=10)
    assert net.n_blocks == 3 == len(net.heads)
    assert sum(len(b) for b in net.blocks) == 6  # 1 projection + 5 residual layers, grouped
    out = net(torch.randn(4, 1, 8, 8))
    assert len(out) == 3 and all(z.shape == (4, 10) for z in out)
    dotted = ModelConfig(name="custom", target=TARGET.replace(":", "."))
    assert build_model(dotted, (1, 8, 8), 10).n_blocks == 4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target": None}, "model=custom needs model.target"),
        ({"target": "no_such_pkg.mod:fn"}, "cannot import no_such_pkg.mod"),
        ({"target": "tests.models.test_custom:nope"}, "has no nope"),
        ({"target": "tests.models.test_custom:not_layers"}, "must return a non-empty list"),
        ({"target": TARGET, "kwargs": {"colour": 1}}, "failed while calling it: TypeError"),
    ],
)
def test_bad_custom_model_is_one_clear_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_model(ModelConfig(name="custom", **kwargs), (1, 8, 8), 10)


USER_CODE = {  # a user's module that fails, and what the one line must say
    "syntax": ("def make(:\n", "failed while importing user_syntax: SyntaxError"),
    "raises": ("raise RuntimeError('no GPU here')\n",
               "failed while importing user_raises: RuntimeError: no GPU here"),
    "build": ("def make(**kw):\n    raise KeyError('layer_norm')\n",
              "failed while calling it: KeyError: 'layer_norm'"),
    "chain": ("import torch.nn as nn\ndef make(**kw):\n"
              "    return [nn.Flatten(), nn.Linear(64, 32), nn.Linear(7, 10)]\n",
              "block 3 of 3 fails on an input of shape (32,)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(USER_CODE))
def test_user_code_that_fails_is_one_line_with_its_traceback_in_a_log(case, tmp_path, monkeypatch):
    source, words = USER_CODE[case]
    (tmp_path / f"user_{case}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(name="custom", target=f"user_{case}:make"), (1, 8, 8), 10)
    msg = str(e.value)
    assert "\n" not in msg and words in msg, msg
    if case != "chain":  # the user's own traceback is kept, in the file the line names
        log = Path(msg.split("(traceback in ")[1].rstrip(")"))
        assert f"user_{case}" in log.read_text()
        log.unlink()


@pytest.mark.parametrize("model", ["mlp", "custom"])
def test_more_blocks_than_layers_is_one_line(model):
    cfg = (ModelConfig(name="mlp", depth=3, blocks=5) if model == "mlp" else
           ModelConfig(name="custom", target=TARGET, kwargs={"depth": 2}, blocks=9))  # fmt: skip
    with pytest.raises(ConfigError, match="model.blocks=.* is out of range"):
        build_model(cfg, (1, 8, 8), 10)


def test_target_only_with_custom():
    with pytest.raises(ConfigError, match="model.target applies to model=custom only"):
        ModelConfig(name="mlp", target=TARGET)


STEPS = ["train.epochs=1", "train.max_steps=12"]


@pytest.mark.multiprocess
def test_custom_model_pipelines_like_the_zoo(tmp_path):
    """SID pipeline == sequential SID on the custom model; the BP pipeline trains it too."""
    seq, pipe, bp = tmp_path / "seq", tmp_path / "pipe", tmp_path / "bp"
    r = run_cli([*BASE, *CUSTOM, *STEPS, "pipeline.stages=1"], seq)
    assert r.returncode == 0, r.stderr
    r = run_cli([*BASE, *CUSTOM, *STEPS, "pipeline.stages=2"], pipe)
    assert r.returncode == 0, r.stderr
    want, got = load_state(seq), load_state(pipe)
    assert set(got) == set(want) and any(k.endswith("gate") for k in got)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-6, atol=1e-7), key
    r = run_cli([*BASE, *CUSTOM, *STEPS, "method=bp", "pipeline.stages=2",
                 "pipeline.microbatches=2"], bp)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert read_summary(bp)["test_accuracy"] > 0.3


def conv_layers(in_shape: tuple[int, ...], num_classes: int, width: int = 4):
    """A user's convnet: three conv layers whose blocks give (C,H,W) maps."""
    c = in_shape[0]
    return [nn.Sequential(nn.Conv2d(c if i == 0 else width, width, 3, padding=1), nn.ReLU())
            for i in range(3)]  # fmt: skip


@pytest.mark.parametrize("head", ["pool", "spatial", "conv"])
def test_custom_convnet_gets_every_head(head):
    kinds = {"pool": BeliefHead, "spatial": SpatialBeliefHead, "conv": ConvBeliefHead}
    target = "tests.models.test_custom:conv_layers"
    cfg = ModelConfig(name="custom", target=target, head=head, head_width=6, head_hidden=8)
    torch.manual_seed(0)
    net = build_model(cfg, (1, 8, 8), num_classes=10)
    assert [type(h) for h in net.heads] == [kinds[head]] * 3
    # one local SID-style update reaches every head's parameters
    out = net(torch.randn(4, 1, 8, 8))
    sum(torch.nn.functional.cross_entropy(z, torch.arange(4)) for z in out).backward()
    assert all(p.grad is not None for p in net.heads.parameters())


@pytest.mark.parametrize("head", ["spatial", "conv"])
def test_custom_vector_model_refuses_conv_heads_naming_the_block(head):
    cfg = ModelConfig(name="custom", target=TARGET, head=head, blocks=2)
    with pytest.raises(ConfigError) as e:
        build_model(cfg, (1, 8, 8), num_classes=10)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"model.head={head} needs convnet features (C,H,W), but model=custom block 1 "
                   "of 2 gives (32,); use model.head=pool")  # fmt: skip


def test_custom_conv_head_refusal_comes_before_any_stage_starts(tmp_path):
    msg = refusal([*CUSTOM, "model.width=null", "model.head=conv", "pipeline.stages=2"], tmp_path)
    assert msg.startswith("model.head=conv needs convnet features (C,H,W), but model=custom")
