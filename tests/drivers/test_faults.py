"""A fault in one stage of a real pipeline ends every process with the reason, for SID and
for BP: the rank runner's exception (raise), its non-finite loss check (nan, each method
computes its own loss) and the launcher's watch over its children (a native crash, abort:
the launcher names the signal and the crashing Python frame; the same launcher for both
methods, so SID's pipeline covers it; SIGKILL: tests/runtime/test_checkpoint.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY, assert_run_stopped, run_cli
from tests.runtime.test_checkpoint import metric_keys

PIPELINES = {
    "sid": ["pipeline.stages=3"],
    "bp": ["method=bp", "pipeline.stages=2", "pipeline.schedule=1f1b"],
}
REASONS = {
    "raise": "[stage 1] step 5: RuntimeError: injected fault",
    "nan": "non-finite loss nan",
    "abort": "stage 1 was killed by signal SIGABRT",
}


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "method,kind",
    [("sid", "raise"), ("sid", "nan"), ("sid", "abort"), ("bp", "raise"), ("bp", "nan")],
)
def test_faults_stop_every_process(method, kind, tmp_path):
    r = run_cli(
        [*TINY, *PIPELINES[method], "train.epochs=3", "train.log_every=1"],
        tmp_path,
        timeout=90,
        env={"SIDPIPE_FAULT": f"stage=1,step=5,kind={kind}"},
    )
    assert_run_stopped(r, REASONS[kind], tmp_path)
    faults = sorted(p.name for p in tmp_path.glob("stage*.fault.txt"))
    if kind == "abort":  # faulthandler's stack names the frame that crashed, in the one line
        line = next(ln for ln in r.stderr.splitlines() if "pipeline failed" in ln)
        assert "Fatal Python error: Aborted, in File" in line and "in apply" in line, line
        assert faults == ["stage1.fault.txt"]
    else:  # every stage left by itself, or was stopped: no fault file is left behind
        assert faults == []


# pipeline.max_restarts: a died stage restarts the whole pipeline from its newest checkpoint
# (a killed stage whose run then finishes bitwise: tests/runtime/test_checkpoint.py, beside the
# kill-and-resume test whose uninterrupted run it compares with)
RESTART = [*TINY, "pipeline.stages=2", "train.epochs=2",
           "checkpoint.every_n_steps=10", "checkpoint.keep_last=3"]  # fmt: skip


@pytest.mark.multiprocess
def test_a_recurring_fault_ends_the_run_after_max_restarts(tmp_path):
    """The fault comes back in every attempt (step 25 is past the checkpoint at 20): one
    restart, then the run fails with the last failure's reason, not in a loop."""
    r = run_cli([*RESTART, "pipeline.max_restarts=1", "train.log_every=1"], tmp_path,
                timeout=180, env={"SIDPIPE_FAULT": "stage=1,step=25,kind=raise"})  # fmt: skip
    assert_run_stopped(r, "[stage 1] step 25: RuntimeError: injected fault", tmp_path)
    assert r.stderr.count("sidpipe: restart ") == 1, r.stderr[-3000:]
    assert "sidpipe: restart 1 of 1 after: [stage 1] step 25: RuntimeError" in r.stderr
    assert "pipeline failed (after 1 restart): stage 1 " in r.stderr  # exited, or failed first
    assert "Traceback" not in r.stderr


@pytest.mark.multiprocess
def test_torchrun_restarts_resume_from_the_newest_checkpoint(tmp_path):
    """Under torchrun the agent's own restart re-runs the script: the restarted stages
    continue from the run's newest checkpoint (not from scratch, and not refused because
    the directory holds the died attempt's outputs). Through sidpipe-torchrun: no
    traceback from the agent either."""
    cmd = [sys.executable, "-m", "sidpipe.torchrun", "--standalone", "--nproc-per-node=2",
           "--max-restarts=1", "-m", "sidpipe.train", *RESTART, "pipeline.max_restarts=1",
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "SIDPIPE_FAULT": "stage=1,step=25,kind=kill,attempt=0"}  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sidpipe: restart 1 of 1 after:" in r.stderr, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_00000020 at step 20" in r.stdout
    assert (tmp_path / "summary.json").exists() and "Traceback" not in r.stderr
    keys = metric_keys(tmp_path)  # each step once: the died attempt's lines after 20 dropped
    assert len(set(keys)) == len(keys)


def test_max_restarts_is_validated(tmp_path):
    from sidpipe.config import compose_config
    from sidpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="pipeline.max_restarts must be an integer from 0"):
        compose_config([*TINY, "pipeline.max_restarts=-1"])
    assert compose_config(TINY).pipeline.max_restarts == 0
