"""A run directory holds one run: refuse to mix, requeue safely, clean a died attempt, and
let resume=auto skip anything that is not a good checkpoint. In process (one stage)."""

from __future__ import annotations

import json

import pytest
import torch

from sidpipe.errors import ConfigError
from sidpipe.runtime import checkpoint
from sidpipe.runtime.io import load_state
from sidpipe.runtime.lock import LOCK_FILE
from tests.conftest import refusal, train_in_process

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
    # every result file, not the run-directory lock (its holder line names each attempt)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != LOCK_FILE)
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = train(tmp_path, *CKPT, "resume=auto")
    assert again == json.loads(json.dumps(first))  # the stored summary, as it was
    assert "already complete" in capsys.readouterr().out
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != LOCK_FILE) == files
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


def test_resume_past_the_end_is_refused_and_at_the_end_finishes(tmp_path):
    """A checkpoint at the run's last step (the run died before its summary) is evaluated
    and summarised; one past the end of a shortened run is refused in one line."""
    first = train(tmp_path, *CKPT)
    (tmp_path / "summary.json").unlink()
    again = train(tmp_path, *CKPT, "resume=auto")  # resumed at step 12 of 12
    assert again["test_accuracy"] == first["test_accuracy"]
    (tmp_path / "summary.json").unlink()
    with pytest.raises(ConfigError) as e:
        train(tmp_path, *CKPT, "resume=auto", "train.max_steps=8")
    msg = str(e.value)
    assert "is at step 12, past the 8 steps this run trains" in msg and "\n" not in msg


def test_resume_onto_another_width_names_the_parameter(tmp_path):
    train(tmp_path / "a", *CKPT)
    ckpt = checkpoint.published(tmp_path / "a" / "checkpoints")[-1]
    with pytest.raises(ConfigError) as e:
        train(tmp_path / "b", *CKPT, f"resume={ckpt}", "model.width=16")
    msg = str(e.value)
    assert "is [32, 64] there but [16, 64] in this run's model" in msg and "\n" not in msg, msg


def test_nccl_on_a_cpu_machine_is_refused_before_any_stage_starts(tmp_path):
    msg = refusal(["pipeline.stages=2", "pipeline.transport=nccl", "device=cpu"], tmp_path)
    assert "pipeline.transport=nccl needs CUDA devices" in msg


@pytest.mark.parametrize("content", [b"", b'{"test_acc', b"\x80\x81\xff", b"[1, 2]", b'{"a": 1}'],
                         ids=["empty", "truncated", "binary", "list", "no-config"])  # fmt: skip
def test_a_damaged_summary_under_resume_auto_is_one_line(tmp_path, content):
    train(tmp_path, *CKPT)
    (tmp_path / "summary.json").write_bytes(content)
    with pytest.raises(ConfigError) as e:
        train(tmp_path, *CKPT, "resume=auto")
    msg = str(e.value)
    assert "summary.json is damaged" in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: {k: v for k, v in m.items() if k != "stages"},
        lambda m: {**m, "partition": [[0, 9], [3, 4]]},
        lambda m: {**m, "partition": "all"},
        lambda m: {k: v for k, v in m.items() if k != "config"},
        lambda m: {**m, "method": None},
    ],
    ids=["no-stages", "overlapping-partition", "partition-not-a-list", "no-config", "no-method"],
)
def test_a_damaged_meta_json_is_one_line(tmp_path, edit):
    train(tmp_path / "a", *CKPT)
    ckpt = checkpoint.published(tmp_path / "a" / "checkpoints")[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps(edit(meta)))
    with pytest.raises(ConfigError) as e:
        train(tmp_path / "b", *CKPT, f"resume={ckpt}")
    msg = str(e.value)
    assert "is damaged: meta.json" in msg and "\n" not in msg, msg
