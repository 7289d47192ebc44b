"""Experiment tooling through the real CLI: bf16, hydra multirun, wandb offline files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY, read_summary, run_cli


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "overrides",
    [
        ["pipeline.stages=2"],  # SID pipeline
        ["method=bp", "pipeline.stages=1"],  # BP
    ],
)
def test_bf16_trains_and_says_so(overrides, tmp_path):
    r = run_cli([*TINY, "precision=bf16", "train.epochs=4", *overrides], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    s = read_summary(tmp_path)
    assert s["precision"] == "bf16"
    assert s["test_accuracy"] > 0.5  # chance is 0.1


@pytest.mark.multiprocess
def test_multirun_writes_one_summary_per_job(tmp_path):
    cmd = [sys.executable, "-m", "sidpipe.cli", "train", "-m", *TINY, "pipeline.stages=1",
           "train.epochs=1", "sid.alpha=0.3,0.7", f"hydra.sweep.dir={tmp_path}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2
    alphas = sorted(read_summary(p.parent)["config"]["sid"]["alpha"] for p in summaries)
    assert alphas == [0.3, 0.7]


@pytest.mark.multiprocess
def test_wandb_offline_from_a_pipeline_run(tmp_path):
    r = run_cli(
        [*TINY, "pipeline.stages=2", "train.epochs=2", "train.log_every=5", "logger=wandb"],
        tmp_path,
        env={"WANDB_SILENT": "true"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "exactly one process creates the wandb run"
    blob = runs[0].read_bytes()
    assert len(blob) > 1000
    for key in (b"test_per_depth", b"loss", b"test_accuracy", b"busy_fraction"):
        assert key in blob, key


@pytest.mark.multiprocess
def test_export_load_eval_reproduces_pipeline_accuracy(tmp_path):
    run = tmp_path / "run"
    r = run_cli([*TINY, "pipeline.stages=2", "train.epochs=2", "checkpoint.every_n_steps=46"], run)
    assert r.returncode == 0, r.stderr[-2000:]
    s = read_summary(run)
    last_ckpt = max((run / "checkpoints").glob("step_*"))
    assert last_ckpt.name == "step_00000046"  # the final step: same parameters as the run's end
    for source, out in ((run, tmp_path / "a.pt"), (last_ckpt, tmp_path / "b.pt")):
        e = subprocess.run(
            [sys.executable, "-m", "sidpipe.cli", "export", str(source), str(out)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert e.returncode == 0, e.stderr[-2000:]
        v = subprocess.run(
            [sys.executable, "-m", "sidpipe.cli", "eval", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert v.returncode == 0, v.stderr[-2000:]
        got = json.loads(v.stdout)
        assert got["per_depth_accuracy"] == s["per_depth_accuracy"], source
    # a plain state_dict: loads into the single-process model with weights_only
    import torch

    from sidpipe.config import DataConfig, ModelConfig
    from sidpipe.data import load_data
    from sidpipe.models import build_model

    data = load_data(DataConfig(name="digits"), 0)
    net = build_model(ModelConfig(name="mlp", width=64, depth=4), data.in_shape, data.num_classes)
    net.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True))
