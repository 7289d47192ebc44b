"""The SID rank runner in process: every rank a thread, messages through queues.

The fast tier's check of the runner logic and the cadence (message kinds, evaluation
tables, checkpoints, the resume position): the same guarantees as the multi-process tests
(pipelined SID equals sequential blockwise SID), without starting a process.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sidpipe.config import compose_config
from sidpipe.drivers.runner import PeerFailure
from sidpipe.drivers.sid import SIDRunner
from sidpipe.drivers.single import train_single
from sidpipe.runtime.dist import DistContext
from sidpipe.runtime.io import load_state
from sidpipe.runtime.transport import LoopbackTransport

TINY = ["data=digits", "model=mlp", "model.width=32", "model.depth=4", "train.batch_size=64",
        "progress=false", "train.epochs=2", "train.max_steps=30"]  # fmt: skip


def run_threads(overrides: list[str], run_dir: Path, fault_stage: int | None = None) -> list:
    """run_stages on TINY with these overrides."""
    return run_stages(compose_config([*TINY, *overrides]), run_dir, fault_stage)


def run_stages(cfg, run_dir: Path, fault_stage: int | None = None) -> list:
    """Run every stage of a SID pipeline as a thread; returns each stage's result (or error)."""
    world = cfg.pipeline.stages
    store, links = dist.HashStore(), LoopbackTransport.links(world)
    results: list = [None] * world
    building = threading.Lock()  # the seeded init uses torch's global RNG: one at a time

    def stage(rank: int) -> None:
        ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo", False, store)
        try:
            with building:
                runner = SIDRunner(ctx, cfg, run_dir, LoopbackTransport(rank, links, 30.0))
            if rank == fault_stage:
                runner.fault = BreakAt(7)
            results[rank] = runner.run()
        except Exception as e:  # noqa: BLE001 - the test reads it
            ctx.report_failure(str(e), run_dir)
            results[rank] = e

    threads = [threading.Thread(target=stage, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a stage thread hung"
    return results


class BreakAt:
    """A fault at one step: the loss turns NaN (the runner's own fault hook)."""

    def __init__(self, step: int):
        self.step = step

    def apply(self, step: int, h: torch.Tensor) -> torch.Tensor:
        return h * float("nan") if step == self.step else h


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("seq")
    summary = train_single(compose_config([*TINY, "pipeline.stages=1"]), run_dir)
    return run_dir, summary


LAYOUTS = [
    ["pipeline.stages=2"],
    ["pipeline.stages=3"],
    ["pipeline.stages=2", "pipeline.partition=[1]"],
]


@pytest.mark.parametrize("overrides", LAYOUTS)
def test_threaded_pipeline_equals_sequential(overrides, sequential, tmp_path):
    results = run_threads(overrides, tmp_path)
    assert not any(isinstance(r, Exception) for r in results), results
    seq_dir, seq_summary = sequential
    want, got = load_state(seq_dir), load_state(tmp_path)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    last = results[-1]
    assert last["train_messages"] == seq_summary["steps"] == 30
    assert last["_history"][-1]["test_per_depth"] == seq_summary["per_depth_accuracy"]
    assert all(r["bytes_sent_backward"] == 0 for r in results)


def test_checkpoint_and_resume_in_threads(sequential, tmp_path):
    """Checkpoints at steps 10 and 20; a resumed run from 20 ends where the whole run ends."""
    ckpt = ["pipeline.stages=2", "checkpoint.every_n_steps=10", "checkpoint.keep_last=5"]
    full = tmp_path / "full"
    assert not any(isinstance(r, Exception) for r in run_threads(ckpt, full))
    names = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert names == ["step_00000010", "step_00000020", "step_00000030"]
    resumed = tmp_path / "resumed"
    start = full / "checkpoints" / "step_00000020"
    results = run_threads([*ckpt, f"resume={start}"], resumed)
    assert not any(isinstance(r, Exception) for r in results), results
    want, got = load_state(sequential[0]), load_state(resumed)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_nan_loss_stops_every_stage_with_its_reason(tmp_path):
    results = run_threads(["pipeline.stages=2", "train.log_every=5"], tmp_path, fault_stage=0)
    assert isinstance(results[0], Exception) and "non-finite loss" in str(results[0])
    # stage 1 learns of it on the control plane (or sees the NaN itself), never hangs
    assert isinstance(results[1], (PeerFailure, Exception))
    assert "non-finite loss" in (tmp_path / "failure.txt").read_text()


def test_heartbeat_beats_and_stops_before_exit():
    """The heartbeat thread stamps the store and ends when asked: no daemon thread may still
    be inside a store call while the interpreter shuts down (it aborted a finished stage)."""
    store = dist.HashStore()
    ctx = DistContext(0, 2, 0, torch.device("cpu"), "gloo", False, store)
    ctx.start_heartbeat(store)
    store.wait(["sidpipe/heartbeat/0"], timedelta(seconds=10))
    ctx.stop_heartbeat()
    assert ctx._heartbeat is not None and not ctx._heartbeat.is_alive()
