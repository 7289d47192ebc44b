"""Two nodes for real: two torchrun agents joined by a c10d rendezvous on 127.0.0.1, each
started with launch/torchrun_multi_node.sh and its own variables, one stage per node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from sidpipe.runtime.io import load_state
from tests.conftest import REPO, TINY, fixed_ports, read_summary, run_cli

STEPS = ["train.epochs=2", "train.max_steps=25"]
SCRIPT = REPO / "launch" / "torchrun_multi_node.sh"


def start_nodes(tmp_path, run_dir, args: list[str]) -> list[subprocess.Popen]:
    torchrun = tmp_path / "torchrun"  # TORCHRUN is one word in the script: a tiny wrapper
    torchrun.write_text(f'#!/bin/sh\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    torchrun.chmod(0o755)
    env = {**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1", "RUN_DIR": str(run_dir),
           "RDZV_ENDPOINT": f"127.0.0.1:{fixed_ports()}", "RDZV_ID": uuid.uuid4().hex[:8],
           "TORCHRUN": str(torchrun), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    return [subprocess.Popen(["bash", str(SCRIPT), *args], env=env, cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True) for _ in range(2)]  # fmt: skip


def finish(nodes: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    for p in nodes:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in nodes:
                os.killpg(q.pid, signal.SIGKILL)
            pytest.fail("a node did not finish in time")
        out.append((p.returncode, o, e))
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", [["method=sid"], ["method=bp", "pipeline.schedule=1f1b",
                                                     "pipeline.microbatches=2"]])  # fmt: skip
def test_two_nodes_equal_one_node(method, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_cli([*TINY, *STEPS, *method, "pipeline.stages=2"], one)
    assert r.returncode == 0, r.stderr[-2000:]
    results = finish(start_nodes(tmp_path, two, [*TINY, *STEPS, *method]))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    want, got = load_state(one), load_state(two)
    assert set(got) == set(want)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-6, atol=1e-7), key
    assert read_summary(two)["per_depth_accuracy"] == read_summary(one)["per_depth_accuracy"]
    assert sum("== sidpipe:" in o for _, o, _ in results) == 1  # one report, from rank 0


def kill_node(agent: int) -> None:
    """A node dies: its agent and the stage it runs (torchrun starts each worker in a
    session of its own, so the agent's process group does not hold it)."""
    ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agent)], capture_output=True, text=True)
    for pid in [int(x) for x in ps.stdout.split()] + [agent]:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.multiprocess
def test_killing_one_node_ends_the_other_with_the_reason(tmp_path):
    run_dir = tmp_path / "run"
    nodes = start_nodes(tmp_path, run_dir, [*TINY, "train.epochs=500", "train.log_every=1",
                                            "pipeline.timeout_s=20"])  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in nodes), [p.communicate() for p in nodes]
        time.sleep(0.2)
    time.sleep(1.0)  # both stages are training
    kill_node(nodes[1].pid)
    t0 = time.monotonic()
    code, _, err = finish(nodes[:1], timeout=120)[0]
    assert code != 0
    assert time.monotonic() - t0 < 20 + 45, "the surviving node took longer than the timeout"
    # the surviving stage says what happened, in one line of ours (torchrun's agent then
    # adds its own report of the failed worker, which is not sidpipe's to shorten)
    ours = [line for line in err.splitlines() if line.startswith("sidpipe: error:")]
    assert ours and "lost the connection to a neighbouring stage" in ours[0], err[-3000:]
    assert "lost the connection" in (run_dir / "failure.txt").read_text()


@pytest.mark.multiprocess
def test_a_killed_two_node_run_resumes_from_the_shared_directory(tmp_path, monkeypatch):
    """Both nodes die after the checkpoint at step 10 (stage 1 killed at step 15); the same
    two-node command with resume=auto continues from it and ends where one uninterrupted
    node ends."""
    ckpt = [*TINY, *STEPS, "checkpoint.every_n_steps=10", "pipeline.timeout_s=30"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_cli([*ckpt, "pipeline.stages=2"], one)
    assert r.returncode == 0, r.stderr[-2000:]
    monkeypatch.setenv("SIDPIPE_FAULT", "stage=1,step=15,kind=kill")
    first = finish(start_nodes(tmp_path, two, ckpt))
    monkeypatch.delenv("SIDPIPE_FAULT")
    assert all(code != 0 for code, _, _ in first)
    assert (two / "checkpoints" / "step_00000010").is_dir()
    assert not (two / "summary.json").exists()
    for code, _, err in finish(start_nodes(tmp_path, two, [*ckpt, "resume=auto"])):
        assert code == 0, err[-3000:]
    want, got = load_state(one), load_state(two)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert read_summary(two)["steps"] == 25
