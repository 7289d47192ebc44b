"""A run directory holds one run: refuse to mix, requeue safely, clean a died attempt, and
let resume=auto skip anything that is not a good checkpoint. In process (one stage)."""

from __future__ import annotations

import json

import pytest
import torch

from sidpipe.errors import ConfigError
from sidpipe.runtime import checkpoint
from sidpipe.runtime.io import load_state
from tests.conftest import train_in_process

RUN = ["data=digits", "model=mlp", "model.width=32", "train.batch_size=64", "progress=false",
       "train.epochs=1", "train.max_steps=12", "pipeline.stages=1"]  # fmt: skip
CKPT = ["checkpoint.every_n_steps=4", "checkpoint.keep_last=5"]


def train(tmp, *overrides):
    return train_in_process([*RUN, *overrides], tmp)


def test_a_fresh_run_refuses_a_used_directory(tmp_path):
    train(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run .*summary.json.*resume=auto"):
        train(tmp_path)


def test_requeue_of_a_finished_run_changes_nothing(tmp_path, capsys):
    first = train(tmp_path, *CKPT)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = train(tmp_path, *CKPT, "resume=auto")
    assert again == json.loads(json.dumps(first))  # the stored summary, as it was
    assert "already complete" in capsys.readouterr().out
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    with pytest.raises(ConfigError, match="finished with another config .*optim.lr=0.001, now"):
        train(tmp_path, *CKPT, "resume=auto", "optim.lr=0.01")
    # training a finished run further (a longer run) continues from its newest checkpoint
    longer = train(tmp_path, *CKPT, "resume=auto", "train.max_steps=16")
    assert longer["steps"] == 16


def test_resume_auto_after_an_attempt_without_checkpoints_starts_clean(tmp_path):
    (tmp_path / "model").mkdir()
    torch.save({"blocks.99.weight": torch.zeros(1)}, tmp_path / "model" / "stage1.pt")  # stale
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 999}\n')
    train(tmp_path, "resume=auto")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["stage0.pt"]
    assert "blocks.99.weight" not in load_state(tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert 999 not in [json.loads(x).get("step") for x in lines]


def test_stray_entries_and_a_corrupt_newest_checkpoint(tmp_path):
    """A backup copy and a file in checkpoints/ are not checkpoints; a corrupt newest
    meta.json makes resume=auto fall back to the one before, with no traceback."""
    root = tmp_path / "checkpoints"
    (root / "step_backup").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    train(tmp_path, *CKPT, "train.max_steps=8")  # checkpoints at 4 and 8, strays untouched
    assert [p.name for p in checkpoint.published(root)] == ["step_00000004", "step_00000008"]
    assert (root / "step_backup").is_dir() and (root / "notes.txt").exists()
    (root / "step_00000008" / "meta.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable meta.json"):
        checkpoint.verify(root / "step_00000008")
    assert checkpoint.latest_good(root) == root / "step_00000004"
    (tmp_path / "summary.json").unlink()  # as if the run had died after its checkpoint
    summary = train(tmp_path, *CKPT, "train.max_steps=8", "resume=auto")
    assert summary["steps"] == 8
    assert checkpoint.verify(root / "step_00000008")["step"] == 8  # saved anew, whole
