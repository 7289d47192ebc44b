"""Real multi-process SID pipelines (gloo, CPU, 1 thread per process) through the CLI."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from sidpipe.drivers.launch import reporting_stage
from sidpipe.runtime.io import load_state
from tests.conftest import (
    REPO,
    TINY,
    assert_run_stopped,
    read_summary,
    refusal,
    run_clean,
    run_cli,
    torchrun,
)

STEPS = ["train.epochs=2", "train.max_steps=25"]  # >= 20 updates, an epoch boundary, 2 evals


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The sequential blockwise trainer: one process, same seed, data order and batches."""
    run_dir = tmp_path_factory.mktemp("seq")
    r = run_cli([*TINY, *STEPS, "pipeline.stages=1"], run_dir)
    assert r.returncode == 0, r.stderr
    return run_dir


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "name,overrides",
    [
        ("2 stages", ["pipeline.stages=2"]),
        ("3 stages", ["pipeline.stages=3"]),
        ("virtual stages: 1+3 modules", ["pipeline.stages=2", "pipeline.partition=[1]"]),
        ("fresh receive buffers", ["pipeline.stages=2", "pipeline.reuse_buffers=false"]),
        ("headers on their own group", ["pipeline.stages=3", "pipeline.host_headers=true"]),
    ],
)
def test_pipeline_equals_sequential(name, overrides, reference, tmp_path):
    r = run_cli([*TINY, *STEPS, *overrides], tmp_path)
    assert r.returncode == 0, r.stderr
    want, got = load_state(reference), load_state(tmp_path)
    assert set(got) == set(want)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-6, atol=1e-7), f"{name}: {key} differs"
    # and the parameters did move: the comparison is not between two untouched inits
    s_seq, s_pipe = read_summary(reference), read_summary(tmp_path)
    assert s_pipe["steps"] == s_seq["steps"] == 25
    assert s_pipe["per_depth_accuracy"] == s_seq["per_depth_accuracy"]
    assert s_pipe["test_accuracy"] > 0.5


@pytest.mark.multiprocess
def test_traffic_is_forward_only_and_counted(tmp_path):
    r = run_cli([*TINY, *STEPS, "pipeline.stages=3", "pipeline.trace=true"], tmp_path)
    assert r.returncode == 0, r.stderr
    s = read_summary(tmp_path)
    stages = s["per_stage"]
    assert [st["bytes_sent_backward"] for st in stages] == [0, 0, 0]
    # Re-derive the forward bytes from the data and the model's shapes.
    from sidpipe.config import Config, DataConfig, ModelConfig
    from sidpipe.data import load_data
    from sidpipe.models import build_model

    data = load_data(DataConfig(name="digits"), 0)
    net = build_model(ModelConfig(name="mlp", width=64, depth=4), data.in_shape, data.num_classes)
    assert Config().pipeline.queue_depth >= 1
    header, k = 16 * 8, data.num_classes
    train_sizes = (
        [64] * 22 + [len(data.train) - 22 * 64] + [64] * 2
    )  # epoch 0 (23 batches), epoch 1
    test_sizes = [min(500, len(data.test) - i) for i in range(0, len(data.test), 500)]
    for stage, st in enumerate(stages[:-1]):
        width = math.prod(net.block_shapes()[st["modules"][-1]])
        per_sample = width * 4 + k * 4 + 8  # h fp32 + belief fp32 + label int64
        n_before = st["modules"][0]  # depths whose [hits, count] rows arrive before this stage
        n_rows = n_before + len(st["modules"])
        expected = (
            sum(train_sizes + test_sizes * 2) * per_sample  # 2 evaluation passes (one per epoch)
            + header * (len(train_sizes) + 2 * len(test_sizes))  # TRAIN / EVAL messages
            + 2 * (header + n_rows * 2 * 8)  # EVAL_END with the per-depth table
            + 2 * header
            + header  # EPOCH_END x2, STOP
        )
        assert st["bytes_sent_forward"] == expected, f"stage {stage}"
    assert stages[-1]["bytes_sent_forward"] == 0  # the sink sends nothing
    trace = (tmp_path / "trace.json").read_text()
    for span in ("recv-wait", "recv", "forward", "send", "backward+step"):
        assert f'"{span}"' in trace


@pytest.mark.multiprocess
def test_torchrun_launch_writes_one_summary(tmp_path):
    cmd = [
        *torchrun(2),
        *TINY,
        "train.max_steps=10",
        "train.epochs=1",
        "pipeline.stages=2",
        f"hydra.run.dir={tmp_path}",
    ]
    r = run_clean(cmd, tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    s = read_summary(tmp_path)
    assert s["stages"] == 2 and len(s["per_stage"]) == 2
    assert r.stdout.count("== sidpipe:") == 1  # only rank 0 reports
    assert sorted(p.name for p in tmp_path.glob("summary*.json")) == ["summary.json"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["pipeline.stages=3"], "world size 2 != pipeline.stages=3"),
        (
            ["pipeline.stages=2", "pipeline.cpu_affinity=true", "pipeline.threads=512"],
            "gives each of 2 stage(s) on this node its own pipeline.threads=512 core(s)",
        ),
    ],
)
def test_torchrun_bad_layout_fails_every_rank(overrides, message, tmp_path):
    cmd = [*torchrun(2), *TINY, *overrides, f"hydra.run.dir={tmp_path}"]
    r = run_clean(cmd, tmp_path, timeout=120)
    assert r.returncode != 0
    assert message in r.stderr


def test_the_headline_follows_a_stopping_line_to_its_cause():
    """If a peer's "stopping: [stage b]" line reached failure.txt first, b is still named."""
    assert reporting_stage("[stage 2] step 5: RuntimeError: injected fault") == 2
    assert reporting_stage("[stage 0] stopping: [stage 2] step 5: RuntimeError: x") == 2
    assert reporting_stage("no stage reported a reason") is None


@pytest.mark.multiprocess
def test_the_headline_names_the_stage_that_failed(tmp_path):
    """A fault in the last stage: the others stop because of it, and the launcher's headline
    names stage 2 (the first reporter), not the lowest rank that exited with an error."""
    r = run_cli(
        [*TINY, "pipeline.stages=3", "train.epochs=3", "train.log_every=1"],
        tmp_path,
        timeout=90,
        env={"SIDPIPE_FAULT": "stage=2,step=5,kind=raise"},
    )
    assert_run_stopped(r, "pipeline failed: stage 2 ", tmp_path)
    assert "first reported: [stage 2] step 5: RuntimeError: injected fault" in r.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["pipeline.stages=5"], "pipeline.stages=5 exceeds the model's 4 blocks"),
        (["pipeline.stages=2", "pipeline.partition=[4]"], "pipeline.partition=[4] must list 1"),
        (
            ["pipeline.stages=2", "pipeline.partition=[1,2]"],
            "must list 1 cut points (one fewer than the 2 pipeline stages)",
        ),
        (
            ["method=bp", "pipeline.stages=2", "pipeline.microbatches=3"],
            "train.batch_size=64 is not divisible by pipeline.microbatches=3",
        ),
        (["sid.variant=shared", "pipeline.stages=2"], "cannot be pipelined"),
        (
            ["pipeline.stages=2", "pipeline.cpu_affinity=true", "pipeline.threads=512"],
            "pipeline.cpu_affinity=true gives each of 2 stage(s) on this node its own",
        ),
        (  # one process, same rule
            ["pipeline.stages=1", "pipeline.cpu_affinity=true", "pipeline.threads=512"],
            "gives each of 1 stage(s) on this node its own pipeline.threads=512 core(s)",
        ),
    ],
)
def test_bad_layouts_fail_before_training(overrides, message, tmp_path):
    assert message in refusal(overrides, tmp_path)


@pytest.mark.multiprocess
def test_the_cli_prints_a_refusal_as_one_line(tmp_path):
    """The CLI path of the refusals above: one line, no traceback, nothing started."""
    r = run_cli([*TINY, "pipeline.stages=5"], tmp_path, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("sidpipe: error: pipeline.stages=5 exceeds the model's 4 blocks")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_entry_point_exists():
    assert shutil.which("sidpipe") or (REPO / ".venv" / "bin" / "sidpipe").exists()
