"""Every promise holds with every belief head: the spatial and conv heads (model.head) carry
BatchNorm, parameters and their own cost, and none of that may break what the pool head
keeps. Per head, on a tiny convnet (gloo, CPU, one thread per process):

- the SID pipeline equals the sequential trainer bit for bit and sends nothing backward;
- a pipeline cut short and resumed from its checkpoint equals the uninterrupted one;
- export -> eval (single process, eval mode) reproduces the run's own per-depth accuracy,
  which it can only do if the run's evaluation normalised with the heads' running
  statistics too; anytime inference exits where its beliefs say.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sidpipe import export, inference
from sidpipe.config import compose_config
from sidpipe.models import build_net
from sidpipe.runtime.io import load_state
from tests.conftest import TINY, read_summary, refusal, run_cli

HEADS = ["spatial", "conv"]
# simplecnn on the 8x8 digits: four blocks of (8x8, 8x8, 4x4, 4x4 -> 2x2) maps, no BatchNorm of
# its own, so any train/eval difference comes from the heads
CONVNET = ["model=simplecnn", "model.width=4", "model.head_width=6", "model.head_hidden=16"]
BASE = [*[a for a in TINY if not a.startswith("model")], *CONVNET]
STEPS = ["train.epochs=1", "train.max_steps=12", "checkpoint.every_n_steps=4"]


@pytest.fixture(scope="module", params=HEADS)
def runs(request, tmp_path_factory):
    """Per head: the sequential trainer and an uninterrupted 2-stage pipeline."""
    head = [f"model.head={request.param}"]
    root = tmp_path_factory.mktemp(request.param)
    for name, stages in (("seq", 1), ("pipe", 2)):
        r = run_cli([*BASE, *head, *STEPS, f"pipeline.stages={stages}"], root / name)
        assert r.returncode == 0, r.stderr[-2000:]
    return request.param, root


@pytest.mark.multiprocess
def test_pipeline_equals_sequential_bitwise_and_sends_nothing_back(runs):
    head, root = runs
    want, got = load_state(root / "seq"), load_state(root / "pipe")
    assert set(got) == set(want)
    assert any(".bn" in k or "running_mean" in k for k in got if k.startswith("heads."))
    for key in want:
        assert torch.equal(got[key], want[key]), f"{head}: {key} differs"
    seq, pipe = read_summary(root / "seq"), read_summary(root / "pipe")
    assert pipe["per_depth_accuracy"] == seq["per_depth_accuracy"]
    assert [st["bytes_sent_backward"] for st in pipe["per_stage"]] == [0, 0]
    assert pipe["per_stage"][0]["bytes_sent_forward"] > 0
    # the heads trained: not two untouched initialisations compared
    cfg = compose_config([*BASE, f"model.head={head}"])
    init = build_net(cfg, SimpleNamespace(in_shape=(1, 8, 8), num_classes=10)).state_dict()
    assert init.keys() == want.keys() and pipe["steps"] == 12
    assert all(not torch.equal(init[k], want[k]) for k in want if k.endswith("running_mean"))


@pytest.mark.multiprocess
def test_pipeline_resume_is_bitwise(runs, tmp_path):
    head, root = runs
    args = [*BASE, f"model.head={head}", *STEPS, "pipeline.stages=2"]
    r = run_cli([*args, "train.max_steps=6"], tmp_path)  # stops after step 6
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli([*args, "resume=auto"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    want, got = load_state(root / "pipe"), load_state(tmp_path)
    assert set(got) == set(want)
    for key in want:  # BatchNorm running statistics and num_batches_tracked included
        assert torch.equal(got[key], want[key]), f"{head}: {key} differs"


@pytest.mark.multiprocess
def test_export_eval_reproduces_the_run_and_exits_early(runs, tmp_path):
    head, root = runs
    model = export.export_model(root / "pipe", tmp_path / "model.pt")
    got = inference.evaluate_model(model, [], thresholds=(1e-6, 0.5, 1.0))
    summary = read_summary(root / "pipe")
    assert got["per_depth_accuracy"] == pytest.approx(summary["per_depth_accuracy"], abs=0)
    low, mid, high = got["early_exit"]
    # a belief always has a top class above 1e-6: every sample stops at the first module
    assert low["mean_depth"] == 1.0 and low["accuracy"] == got["per_depth_accuracy"][0]
    assert 1.0 <= mid["mean_depth"] <= high["mean_depth"] <= len(got["per_depth_accuracy"])


@pytest.mark.parametrize("head", HEADS)
def test_vector_models_refuse_conv_heads_in_one_line(head, tmp_path):
    msg = refusal([f"model.head={head}"], tmp_path)  # TINY is the mlp
    assert msg == (f"model.head={head} reads convnet maps (C,H,W), but model=mlp's blocks give "
                   "vectors or tokens: use model.head=pool")  # fmt: skip


@pytest.mark.parametrize(
    "override,words",
    [("model.head=wide", "model.head='wide' is unknown"), ("model.head_width=0", ">= 1")],
)
def test_bad_head_values_refused_in_one_line(override, words, tmp_path):
    msg = refusal([*CONVNET, override], tmp_path)
    assert words in msg and "\n" not in msg


def test_shared_variant_refuses_a_head_it_would_ignore(tmp_path):
    msg = refusal(["sid.variant=shared", "pipeline.stages=1", *CONVNET, "model.head=conv"],
                  tmp_path)  # fmt: skip
    assert msg.startswith("model.head=conv applies to blockwise models; sid.variant=shared")


@pytest.mark.multiprocess
def test_cli_prints_one_line_no_traceback(tmp_path):
    r = run_cli([*TINY, "model.head=spatial"], tmp_path)
    assert r.returncode != 0
    assert r.stderr.startswith("sidpipe: error: model.head=spatial reads convnet maps")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
