"""Checkpoint and resume: atomic per-stage DCP saves, damage detection, exact resumption."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from sidpipe.errors import SidpipeError
from sidpipe.runtime import checkpoint
from sidpipe.runtime.io import load_state
from tests.conftest import TINY, run_cli, train_in_process

CKPT = ["train.epochs=2", "checkpoint.every_n_steps=10", "checkpoint.keep_last=3"]


def _toy():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    return m, opt


def _save(root, step, m, opt, keep_last=5):
    meta = {"stages": 1, "method": "sid", "partition": [[0, 2]], "config": {}}
    return checkpoint.save(root, step, 0, 1, m, [opt], {"step": step}, meta, keep_last)


def test_save_load_roundtrip_and_keep_last(tmp_path):
    m, opt = _toy()
    for step in (1, 2, 3):
        _save(tmp_path, step, m, opt, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    m2, opt2 = (
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
        None,
    )
    opt2 = torch.optim.Adam(m2.parameters())
    extra = checkpoint.load(tmp_path / "step_00000003", 0, m2, [opt2])
    assert extra == {"step": 3}
    for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(
        opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"]
    )


def test_damaged_and_partial_checkpoints_are_never_loaded(tmp_path):
    m, opt = _toy()
    _save(tmp_path, 10, m, opt)
    good = tmp_path / "step_00000010"
    bad = _save(tmp_path, 20, m, opt)
    shutil.copytree(good, tmp_path / "step_00000030.tmp")  # a save that crashed mid-write
    blob = next(bad.glob("stage0/*.distcp"))
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])  # truncated file
    assert checkpoint.latest_good(tmp_path) == good
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.verify(bad)
    (good / "meta.json").unlink()
    assert checkpoint.latest_good(tmp_path) is None


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "method", [["method=sid"], ["method=bp", "pipeline.microbatches=4", "data.subset=1280"]]
)
def test_pipeline_kill_and_resume_is_exact(method, tmp_path):
    """Killed, then resumed (and for SID: killed and restarted in place) == uninterrupted."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = [*TINY, *CKPT, *method, "pipeline.stages=2"]
    r = run_cli(args, full)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(args, cut, env={"SIDPIPE_FAULT": "stage=1,step=25,kind=kill"})
    assert r.returncode != 0 and "killed by signal SIGKILL" in r.stderr
    # Damage the newest checkpoint: resume must fall back to the one before it.
    newest = max((cut / "checkpoints").glob("step_*"))
    assert newest.name == "step_00000020"
    blob = next(newest.glob("stage1/*.distcp"))
    blob.write_bytes(blob.read_bytes()[:100])
    r = run_cli([*args, "resume=auto"], cut)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "step_00000010 at step 10" in r.stdout
    want, got = load_state(full), load_state(cut)
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # metrics.jsonl: the lines the killed attempt logged after step 10 were dropped, so the
    # resumed run's file has the uninterrupted run's lines, each once
    assert Counter(metric_keys(cut)) == Counter(metric_keys(full))  # stages interleave
    if method != ["method=sid"]:
        return
    # pipeline.max_restarts: the same kill, in the first attempt only; the agent restarts
    # both stages, they resume from step 20 and the run finishes as the uninterrupted one
    again = tmp_path / "restarted"
    r = run_cli([*args, "pipeline.max_restarts=2"], again, timeout=240,
                env={"SIDPIPE_FAULT": "stage=1,step=25,kind=kill,attempt=0"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sidpipe: restart 1 of 2 after:" in r.stderr, r.stderr[-2000:]
    assert "resuming from " in r.stderr and "step_00000020" in r.stderr
    assert "restart 2 of 2" not in r.stderr and "Traceback" not in r.stderr
    got = load_state(again)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert Counter(metric_keys(again)) == Counter(metric_keys(full))  # each step once
    assert not (again / "failure.txt").exists()


@pytest.mark.parametrize("method", ["sid", "bp"])
def test_single_process_resume_is_exact(method, tmp_path, caplog):
    """In this process: the single-process trainer is what `sidpipe train` runs at S=1."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    base = [*TINY, *CKPT, "pipeline.stages=1", f"method={method}"]
    train_in_process(base, full)
    train_in_process([*base, "train.max_steps=25"], cut)  # stops after step 25
    with caplog.at_level("INFO", logger="sidpipe"):
        train_in_process([*base, "resume=auto"], cut)
    assert "step_00000020 at step 20" in caplog.text  # its newest checkpoint (every 10 steps)
    want, got = load_state(full), load_state(cut)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # the first run finished at step 25 and was continued from its checkpoint at step 20:
    # every (kind, step) line appears once, in training order
    keys = metric_keys(cut)
    assert len(set(keys)) == len(keys)
    steps = [k[2] for k in keys if k[0] == "train"]
    assert steps == sorted(steps) and steps[-1] > 25


def metric_keys(run_dir: Path) -> list[tuple]:
    """(kind, stage, step) of every metrics.jsonl line, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r.get("kind"), r.get("stage"), r.get("step")) for r in map(json.loads, lines)]


@pytest.mark.multiprocess
def test_resume_on_another_layout_is_refused(tmp_path):
    r = run_cli([*TINY, *CKPT, "pipeline.stages=2", "train.max_steps=10"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]

    # The refusals come from the launcher, before any stage process starts: in this process.
    def refused(overrides: list[str], run_dir: Path) -> str:
        with pytest.raises(SidpipeError) as e:
            train_in_process([*TINY, *overrides], run_dir)
        return str(e.value)

    msg = refused([*CKPT, "pipeline.stages=3", "resume=auto"], tmp_path)
    assert "finished with another config (pipeline.stages=2, now 3" in msg  # nothing trained
    (tmp_path / "summary.json").unlink()  # as if it had stopped after its last checkpoint
    for other in ("pipeline.stages=3", "method=bp"):
        msg = refused([*CKPT, other, "resume=auto"], tmp_path)
        assert "was written by a 2-stage sid run" in msg and "is not supported" in msg
    assert not (tmp_path / "failure.txt").exists()  # no stage process was started
    assert "does not exist" in refused(["pipeline.stages=1", f"resume={tmp_path / 'no'}"],
                                       tmp_path / "x")  # fmt: skip


class _Payload:
    """What a crafted checkpoint would carry: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _restamp(step_dir):
    """Update meta.json's sizes and checksums to the files as they are now (as an attacker
    would, so the checksum check does not catch the change)."""
    import json

    meta_path = step_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    for rel in meta["files"]:
        f = step_dir / rel
        meta["files"][rel] = [f.stat().st_size, checkpoint._sha256(f)]
    meta_path.write_text(json.dumps(meta))


def test_crafted_metadata_never_runs_code(tmp_path):
    """A checkpoint whose DCP .metadata pickle names os.system is refused in one line; the
    command never runs (torch's own reader would unpickle it with plain pickle.load)."""
    import pickle

    m, opt = _toy()
    step_dir = _save(tmp_path, 10, m, opt)
    marker = tmp_path / "pwned"
    (step_dir / "stage0" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _restamp(step_dir)
    assert checkpoint.verify(step_dir)  # the checksums match: only the content is hostile
    with pytest.raises(checkpoint.CheckpointError, match="unsafe metadata") as err:
        checkpoint.load(step_dir, 0, m, [opt])
    assert "posix.system is not allowed" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_real_metadata_passes_the_allow_list(tmp_path):
    """Everything a real checkpoint holds (model, Adam state, the run state, the RNG) loads
    through the restricted reader, so the allow-list is not just refusing everything."""
    m, opt = _toy()
    step_dir = _save(tmp_path, 10, m, opt)
    m2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt2 = torch.optim.Adam(m2.parameters(), lr=0.5)
    assert checkpoint.load(step_dir, 0, m2, [opt2]) == {"step": 10}
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters(), strict=True))


def test_a_full_disk_is_one_line_and_leaves_no_partial_part(tmp_path, monkeypatch):
    """DCP reports a full disk as CheckpointException around the OSError; the save names
    the path and the cause, and removes what it had written of this stage's part."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    def full_disk(state, checkpoint_id, **kwargs):
        (checkpoint_id / "__0_0.distcp").write_bytes(b"half a tensor")
        cause = OSError(errno.ENOSPC, "No space left on device")
        raise CheckpointException("save", {0: (cause, None)})

    monkeypatch.setattr(checkpoint.dcp, "save", full_disk)
    m, opt = _toy()
    with pytest.raises(checkpoint.CheckpointError) as err:
        _save(tmp_path, 10, m, opt)
    message = str(err.value)
    assert "step_00000010.tmp/stage0" in message and "No space left on device" in message
    assert "\n" not in message
    assert not (tmp_path / "step_00000010.tmp" / "stage0").exists()
