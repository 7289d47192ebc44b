"""benchmarks/cifar10_convnets.sh still describes the committed CIFAR-10 convnet study.

The script is run for real with a `sidpipe` on PATH that adds study.plan=true: every
invocation composes and validates its runs but trains nothing. Its run names carry a digest
of each run's overrides, so equal names mean the script reproduces those exact runs — and
that rerunning it resumes the study instead of starting another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "cifar10_convnets.sh"
RESULTS = REPO / "benchmarks" / "results" / "cifar10-convnets-50-epochs-2026-12-01"
RESULTS_100 = REPO / "benchmarks" / "results" / "cifar10-convnets-100-epochs-2026-12-01"


def planned(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    shim = tmp_path / "bin" / "sidpipe"
    shim.parent.mkdir(exist_ok=True)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m sidpipe.cli "$@" study.plan=true\n')
    shim.chmod(0o755)
    path = f"{shim.parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PATH": path, **env}, timeout=300)  # fmt: skip


def run_names(r: subprocess.CompletedProcess) -> set[str]:
    """The runs a plan lists, one `name: ...` line each."""
    return {line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("cifar10-")}


def committed(folder: Path) -> set[str]:
    return {r["name"] for r in json.loads((folder / "blockwise.json").read_text())["rows"]}


@pytest.mark.multiprocess
def test_the_script_plans_exactly_the_committed_runs(tmp_path) -> None:
    r = planned(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lrs = [RESULTS / f"lr-{lr}" for lr in ("3e-4", "3e-3", "1e-2")]
    expected = set().union(*(committed(f) for f in [RESULTS, RESULTS / "bp-100-epochs", *lrs]))
    assert len(expected) == 42 + 3 + 3 * 15  # 2 models x 7 cells x 3 seeds; BP x 3; 3 lrs
    assert run_names(r) == expected


@pytest.mark.multiprocess
def test_the_100_epoch_command_plans_exactly_its_committed_runs(tmp_path) -> None:
    """The 100-epoch study: both models, and its two convergence checks at 200 epochs."""
    r = planned(tmp_path, EPOCHS="100", OUT=str(RESULTS_100.relative_to(REPO)),
                PARTS="resnet18 vgg11 bp-epochs vgg11-epochs")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    checks = [RESULTS_100 / "bp-200-epochs", RESULTS_100 / "vgg11-200-epochs"]
    expected = set().union(*(committed(f) for f in [RESULTS_100, *checks]))
    assert len(expected) == 42 + 3 + 21  # 2 models x 7 cells x 3 seeds; BP x 3; VGG-11 x 21
    assert run_names(r) == expected


@pytest.mark.multiprocess
def test_an_unknown_part_is_named(tmp_path) -> None:
    r = planned(tmp_path, PARTS="resnet18 vgg")
    assert r.returncode == 2
    assert "unknown part 'vgg' in PARTS" in r.stderr
    assert "cifar10-" not in r.stdout  # checked before anything runs
