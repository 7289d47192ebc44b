"""Ctrl-C ends a run in one line, with the shell's exit code (128 + the signal), no
traceback and no stage process left behind. A scheduler's SIGUSR1 or SIGTERM preempts it:
every stage saves a checkpoint at the next step boundary, the run exits 75, and
resume=auto finishes it exactly as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from sidpipe.errors import EXIT_PREEMPTED
from sidpipe.runtime.io import load_state
from tests.conftest import REPO, TINY, read_summary, run_cli
from tests.runtime.test_checkpoint import metric_keys


def start(tmp_path, stages: int, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sidpipe.cli", "train", *TINY, f"pipeline.stages={stages}",
           "train.epochs=500", "train.log_every=1", *args,
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # its own session: a signal to the group is what a terminal's Ctrl-C does
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO, start_new_session=True)  # fmt: skip


def wait_for_training(tmp_path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    metrics = tmp_path / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and '"kind": "train"' in metrics.read_text():
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the run never started training")


@pytest.mark.multiprocess
def test_ctrl_c_ends_the_run_in_one_line(tmp_path):
    sig = signal.SIGINT
    proc = start(tmp_path, 2)
    wait_for_training(tmp_path, proc)
    os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not stop within 60 s of the signal")
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "summary.json").exists()
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout.strip() == ""


PREEMPT = ["checkpoint.every_n_steps=100", "train.epochs=20", "train.eval_every_epoch=false",
           "train.log_every=1"]  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "sig,method,group",
    [(signal.SIGUSR1, ["pipeline.stages=2"], False),
     (signal.SIGTERM, ["pipeline.stages=2", "method=bp", "pipeline.schedule=1f1b",
                      "data.subset=640"], True),
     (signal.SIGTERM, ["pipeline.stages=1"], False)],
    ids=["SIGUSR1 to the SID launcher", "SIGTERM to every BP process", "SIGTERM, one process"],
)  # fmt: skip
def test_a_preempted_run_checkpoints_and_resumes_exactly(sig, method, group, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    cmd = [sys.executable, "-m", "sidpipe.cli", "train", *TINY, *method, *PREEMPT,
           f"hydra.run.dir={cut}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO, start_new_session=True)  # fmt: skip
    wait_for_training(cut, proc)
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not stop within 90 s of the signal")
    assert proc.returncode == EXIT_PREEMPTED == 75, err[-2000:]
    line = next((ln for ln in err.splitlines() if "preempted by" in ln), err[-2000:])
    assert line.startswith(f"sidpipe: preempted by {sig.name} at step "), line
    assert "continue it with resume=auto" in line and "Traceback" not in err, err[-2000:]
    step = int(line.split(" at step ")[1].split()[0])
    assert (cut / "checkpoints" / f"step_{step:08d}" / "meta.json").exists(), line
    assert not (cut / "summary.json").exists()
    r = run_cli([*TINY, *method, *PREEMPT, "resume=auto"], cut, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"step_{step:08d} at step {step}" in r.stdout + r.stderr
    r = run_cli([*TINY, *method, *PREEMPT], full, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    want, got = load_state(full), load_state(cut)
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert Counter(metric_keys(cut)) == Counter(metric_keys(full))
    assert read_summary(cut)["per_depth_accuracy"] == read_summary(full)["per_depth_accuracy"]


def stage_pid(launcher: int, rank: int) -> int:
    """The stage process of `rank`: the launcher's spawned workers, started in rank order."""
    ps = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(launcher)],
                        capture_output=True, text=True)  # fmt: skip
    workers = sorted(int(line.split()[0]) for line in ps.stdout.splitlines()
                     if "spawn_main" in line)  # fmt: skip
    assert len(workers) > rank, ps.stdout
    return workers[rank]


@pytest.mark.multiprocess
def test_a_frozen_stage_is_named_within_the_timeout(tmp_path):
    """SIGSTOP: the frozen stage cannot say anything; its neighbours time out, find it
    silent on the control plane (no heartbeat) and name it, and the run ends well before
    torchelastic's 30 s grace for a stage that ignores SIGTERM."""
    cmd = [sys.executable, "-m", "sidpipe.cli", "train", *TINY, "pipeline.stages=3",
           "pipeline.timeout_s=10", "train.epochs=500", "train.log_every=1",
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO, start_new_session=True)  # fmt: skip
    wait_for_training(tmp_path, proc)
    os.kill(stage_pid(proc.pid, 1), signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not end after a stage froze")
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "stage 1 stopped responding (no heartbeat" in err, err[-3000:]
    assert "pipeline failed: stage 1 " in err  # the headline names the frozen stage too
    assert elapsed < 10 + 25, f"took {elapsed:.0f} s"
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout.strip() == ""
