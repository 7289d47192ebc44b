"""A full disk is named as one, and leaves nothing half-written: no partial model file, no
parts of a checkpoint that no stage finished, and the launcher still says which stage
failed and why although failure.txt cannot be written under the full run directory.

The disk is a 1 MiB tmpfs mounted for the test (root only; skipped, with the reason, where
mounting is not allowed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from sidpipe import export
from sidpipe.errors import SidpipeError
from tests.conftest import TINY, run_cli, train_in_process


@pytest.fixture
def full_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


BIG = [*TINY, "model.width=256", "pipeline.stages=2", "train.max_steps=12"]


def one_reason(r: subprocess.CompletedProcess) -> str:
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("sidpipe: error: pipeline failed"), r.stderr
    assert "No space left on device" in last and "no stage reported" not in last, last
    assert "enforce fail" not in r.stderr, r.stderr
    return last


@pytest.mark.multiprocess
def test_a_full_run_directory_is_named_and_leaves_no_partial_file(full_disk: Path) -> None:
    run = full_disk / "run"
    one_reason(run_cli(BIG, run))
    # a stage that did write its file wrote it whole; no stage left a partial one
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".new"))]
    for part in run.glob("model/*.pt"):
        assert torch.load(part, weights_only=True)
    assert not (run / "summary.json").exists()


@pytest.mark.multiprocess
def test_a_full_checkpoint_dir_leaves_no_unfinished_checkpoint(
    full_disk: Path, tmp_path: Path
) -> None:
    ckpt = full_disk / "ckpt"
    line = one_reason(run_cli([*BIG, "checkpoint.every_n_steps=4", f"checkpoint.dir={ckpt}"],
                              tmp_path / "run"))  # fmt: skip
    assert "cannot write checkpoint" in line
    assert not list(ckpt.glob("*")), list(ckpt.glob("*"))  # no step_N.tmp with one stage's part


@pytest.mark.multiprocess  # mounts the disk: a process
def test_export_onto_a_full_disk_writes_nothing(full_disk: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_in_process(["data=digits", "model.width=256", "progress=false", "train.max_steps=2",
                      "pipeline.stages=1"], run)  # fmt: skip
    with pytest.raises(SidpipeError) as e:
        export.export_model(run, full_disk / "m.pt")
    assert "No space left on device" in str(e.value) and "\n" not in str(e.value)
    assert not list(full_disk.iterdir())
