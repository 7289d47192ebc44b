"""A fault in one stage of a real pipeline ends every process with the reason, for SID and
for BP: the stage runner's exception (raise), its non-finite loss check (nan, each method
computes its own loss) and the launcher's watch over its children (a native crash, abort:
the launcher names the signal and the crashing Python frame; the same launcher for both
methods, so SID's pipeline covers it; SIGKILL: tests/test_checkpoint.py)."""

from __future__ import annotations

import pytest

from tests.conftest import TINY, assert_run_stopped, run_cli

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
