"""Ctrl-C and a scheduler's SIGTERM end a run in one line, with the shell's exit code
(128 + the signal), no traceback and no stage process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TINY


def start(tmp_path, stages: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sidpipe.cli", "train", *TINY, f"pipeline.stages={stages}",
           "train.epochs=500", "train.log_every=1", f"hydra.run.dir={tmp_path}"]  # fmt: skip
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
@pytest.mark.parametrize(
    "sig,stages,group",
    [(signal.SIGTERM, 2, False), (signal.SIGINT, 2, True), (signal.SIGTERM, 1, False)],
    ids=["SIGTERM to the launcher", "Ctrl-C to the process group", "SIGTERM, one process"],
)
def test_a_signal_ends_the_run_in_one_line(sig, stages, group, tmp_path):
    proc = start(tmp_path, stages)
    wait_for_training(tmp_path, proc)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
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
