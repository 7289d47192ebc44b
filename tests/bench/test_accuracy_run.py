"""A study's run survives an interruption: it continues from its last epoch, exactly."""

from __future__ import annotations

import json

import torch

from sidpipe.bench.accuracy.plan import Run
from sidpipe.bench.accuracy.run import execute, measure
from sidpipe.runtime.io import load_state
from tests.conftest import train_in_process

# 640 digits in batches of 64: 10 steps an epoch, so the epoch-end checkpoints are at 10, 20
BASE = ["data=digits", "data.subset=640", "model=mlp", "model.width=32", "model.depth=4",
        "train.batch_size=64", "train.epochs=3", "progress=false", "pipeline.stages=1",
        "pipeline.threads=1"]  # fmt: skip


def test_an_interrupted_run_continues_from_its_last_epoch(tmp_path, caplog):
    run = Run("blockwise", "digits-mlp-b4-sid-s0", {}, BASE)
    whole = tmp_path / "whole"
    execute(run, whole)
    assert not (whole / "checkpoints").exists()  # removed once the run is done
    # A died attempt: it trained into the second epoch (checkpoint at step 10, as execute
    # asks) and was cut off at step 15, before summary.json.
    cut = tmp_path / "cut"
    train_in_process([*BASE, "train.max_steps=15", "checkpoint.every_n_steps=10", "resume=auto"],
                     cut)  # fmt: skip
    (cut / "summary.json").unlink()
    with caplog.at_level("INFO", logger="sidpipe"):
        summary = execute(run, cut)
    assert "step_00000010 at step 10" in caplog.text
    want, got = load_state(whole), load_state(cut)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert summary["steps"] == 30 and not (cut / "checkpoints").exists()


def test_the_estimate_measures_every_kind_afresh_after_a_warm_up(tmp_path):
    """Each kind of run is timed in a clean folder (a finished probe left by an earlier
    estimate would otherwise be reused and report the old time), after an uncounted warm-up
    that takes the process's one-time costs."""
    kinds = [Run("blockwise", f"digits-mlp-b{b}-sid-s0", {"dataset": "digits", "model": "mlp",
                                                          "blocks": b, "method": "sid"},
                 [*BASE, f"model.blocks={b}"]) for b in (2, 4)]  # fmt: skip
    stale = tmp_path / "estimate" / kinds[0].name
    stale.mkdir(parents=True)
    (stale / "summary.json").write_text('{"samples_per_s": -1.0}')
    rate, n_train = measure({"blockwise": kinds}, tmp_path, steps=3)
    assert sorted(k[2] for k in rate) == [2, 4] and all(v > 0 for v in rate.values())
    assert set(n_train.values()) == {640}
    for name in ("warm-up", *(k.name for k in kinds)):
        summary = json.loads((tmp_path / "estimate" / name / "summary.json").read_text())
        assert summary["steps"] == 3
