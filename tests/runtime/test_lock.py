"""One run per directory, even when two start at once (runtime/lock.py): the second is
refused in one line while the first holds the directory, a dead holder's lock is free at
once, and export, bench and study outputs are guarded the same way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidpipe import export
from sidpipe.errors import ConfigError, SidpipeError
from sidpipe.runtime.lock import LOCK_FILE, exclusive
from tests.conftest import REPO, TINY, read_summary, refusal, train_in_process

RUN = ["data=digits", "model=mlp", "model.width=16", "progress=false", "train.max_steps=2",
       "pipeline.stages=1"]  # fmt: skip


def test_a_run_is_refused_while_another_holds_its_directory(tmp_path: Path) -> None:
    with exclusive(tmp_path):  # flock: a second open file description conflicts, even here
        msg = refusal(["pipeline.stages=1"], tmp_path)
    assert "in use by another sidpipe run" in msg and f"pid {os.getpid()}" in msg, msg
    assert "\n" not in msg
    train_in_process(RUN, tmp_path)  # released: the directory is usable again
    assert (tmp_path / "summary.json").exists()


def test_the_lock_is_released_however_the_holder_ends(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), exclusive(tmp_path):
        raise RuntimeError("the run failed")
    with exclusive(tmp_path):
        pass


def test_a_directory_that_cannot_be_used_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for bad, words in ((tmp_path / "file" / "run", "Not a directory"),
                       (tmp_path / ("x" * 300), "File name too long")):  # fmt: skip
        with pytest.raises(ConfigError) as e:
            train_in_process(RUN, bad)
        assert "cannot use" in str(e.value) and words in str(e.value), e.value


HOLD = """
import sys, time
from sidpipe.runtime.lock import exclusive
with exclusive(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.multiprocess
def test_a_killed_holders_lock_is_not_stale(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on "):
            train_in_process(RUN, tmp_path)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        train_in_process(RUN, tmp_path)  # the kernel released the dead holder's lock
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.multiprocess
def test_two_trains_started_together_keep_one_run(tmp_path: Path) -> None:
    """The race of the issue: two `sidpipe train` on one hydra.run.dir a moment apart. One
    trains and owns every result; the other is refused in one line and writes nothing."""
    run = tmp_path / "run"
    args = [*TINY, "pipeline.stages=2", "train.epochs=1", "train.max_steps=30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmds = [[sys.executable, "-m", "sidpipe.cli", "train", *args, f"seed={seed}",
             f"hydra.run.dir={run}"] for seed in (1, 2)]  # fmt: skip
    first = subprocess.Popen(cmds[0], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(1.0)
    second = subprocess.run(cmds[1], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=180)  # fmt: skip
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 1, second.stderr[-2000:]
    line = second.stderr.strip()
    assert line.startswith("sidpipe: error: run directory") and "\n" not in line, line
    assert "in use by another sidpipe run" in line
    assert read_summary(run)["config"]["seed"] == 1  # every result is the first run's
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [(x["kind"], x.get("stage"), x.get("step")) for x in lines]
    assert len(steps) == len(set(steps)), "two runs' lines in one metrics.jsonl"


def test_export_never_overwrites_a_run_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_in_process(RUN, run)
    before = (run / "summary.json").read_bytes()
    for out in (run / "summary.json", run / "summary", run / "model" / "stage0.pt",
                run / "metrics.jsonl", run / "model"):  # fmt: skip
        with pytest.raises(SidpipeError) as e:
            export.export_model(run, out)
        msg = str(e.value)
        assert "\n" not in msg and ("refusing to overwrite" in msg or "is a directory" in msg)
    assert (run / "summary.json").read_bytes() == before
    first = export.export_model(run, tmp_path / "m.pt")
    assert export.export_model(run, first) == first  # an earlier export may be replaced


def test_export_refuses_a_run_with_a_missing_stage_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_in_process(RUN, run)
    summary = json.loads((run / "summary.json").read_text())
    summary["config"]["pipeline"]["stages"] = 2  # as a 2-stage run whose stage1.pt was lost
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SidpipeError, match="lacks stage1.pt of the run's 2 stages"):
        export.export_model(run, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_bench_and_study_outputs_are_locked(tmp_path: Path) -> None:
    from sidpipe.bench.accuracy import main as accuracy_main
    from sidpipe.bench.throughput import run_bench
    from sidpipe.config import compose_config

    cfg = compose_config(["bench.mode=simulate", f"bench.out_dir={tmp_path}"])
    with exclusive(tmp_path), pytest.raises(ConfigError, match="in use by another sidpipe bench"):
        run_bench(cfg, ["sidpipe", "bench"], tmp_path)
    assert not (tmp_path / "bench.json").exists()
    with exclusive(tmp_path):
        assert accuracy_main(["study.tiny=true", f"study.out={tmp_path}"]) == 1
    assert not any(p.suffix == ".json" for p in tmp_path.iterdir())
    assert (tmp_path / LOCK_FILE).exists()
