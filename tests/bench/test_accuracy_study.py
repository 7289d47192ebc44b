"""The accuracy studies (sidpipe.bench.accuracy) end to end, on their tiny CI configuration.

One subprocess runs every study with `study.tiny=true` (digits, 1 epoch, seed 0, mlp, blocks
[2, 4]); the checks read the tables, JSON rows and plots it leaves. A second call with one
more block count must reuse the finished BP run, train only the new one, and keep the
earlier rows in the merged table. Plan, statistics and config checks run in-process in
test_accuracy_plan.py and test_accuracy_stats.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

STUDIES = ("reference", "blockwise", "noise", "alpha")
PNG = b"\x89PNG\r\n\x1a\n"


def run_study(*args: str, cwd: Path = REPO, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sidpipe.bench.accuracy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def expected_depths(row: dict) -> int:
    if row["method"] == "bp":
        return 1  # BP predicts with the last head only
    return 5 if row["variant"] == "shared" else row["blocks"]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("accuracy")
    proc = run_study("study.name=all", "study.tiny=true", f"study.out={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.multiprocess
def test_tables_rows_and_plots(tiny_results: Path) -> None:
    out = tiny_results
    command = f"sidpipe accuracy study.name=all study.tiny=true study.out={out}"
    for study in STUDIES:
        result = json.loads((out / f"{study}.json").read_text())
        rows = result["rows"]
        assert rows, study
        assert all(r["status"] == "ran" for r in rows), [(r["name"], r["status"]) for r in rows]
        for r in rows:
            for key in ("test_accuracy", "best_epoch_test_accuracy", "val_selected_test_accuracy"):
                assert 0.0 < r[key] <= 1.0, (study, r["name"], key, r[key])
            depth = r["per_depth_accuracy"]
            assert len(depth) == expected_depths(r), (study, r["name"], depth)
            assert all(0.0 <= a <= 1.0 for a in depth)
            assert depth[-1] == pytest.approx(r["test_accuracy"])
            assert r["epochs_run"] == 1 and r["s_per_epoch"] > 0
            assert (out / r["run_dir"] / "summary.json").is_file()
            assert r["command"].startswith("sidpipe train pipeline.stages=1 ")
        md = (out / f"{study}.md").read_text()
        assert command in md and "seeds: [0]; epochs: 1" in md and "machine:" in md, study
        assert "| method |" in md or "| method " in md
        assert result["plots"], study
        for plot in result["plots"]:
            assert (out / plot).read_bytes()[:8] == PNG, plot
        assert result["meta"]["knobs"]["name"] == "all" and result["meta"]["extra"] == []

    blockwise = json.loads((out / "blockwise.json").read_text())["rows"]
    assert sorted((r["method"], r["blocks"]) for r in blockwise) == [
        ("bp", None),
        ("sid", 2),
        ("sid", 4),
    ]
    noise = json.loads((out / "noise.json").read_text())["rows"]
    assert {r["noise"] for r in noise} == {0.0, 0.4}
    assert all(r["label_noise_rate"] > 0.3 for r in noise if r["noise"] == 0.4)
    alpha = json.loads((out / "alpha.json").read_text())["rows"]
    assert {(r.get("kl"), r.get("alpha")) for r in alpha if r["method"] == "sid"} == {
        ("forward", 0.1),
        ("forward", 0.9),
        ("reverse", 0.1),
        ("reverse", 0.9),
    }

    depth_md = (out / "depth.md").read_text()
    assert command in depth_md
    depth_plots = list((out / "plots" / "depth").rglob("*.png"))
    sid_groups = {(r["study"], r["group"]) for s in STUDIES
                  for r in json.loads((out / f"{s}.json").read_text())["rows"]
                  if r["method"] == "sid"}  # fmt: skip
    assert len(depth_plots) == len(sid_groups)

    summary = (out / "summary.md").read_text()
    for title in ("Study 1", "Study 2", "Study 3", "Study 4", "Study 5"):
        assert title in summary
    assert "- Depth: test accuracy never falls" in summary
    assert "- Blockwise mlp (width 256) on digits: SID − BP" in summary  # the width the run used


@pytest.mark.multiprocess
def test_rerun_reuses_and_merges(tiny_results: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(tiny_results, out)
    # a train override that changes no run's result (where the data lives) keeps them reusable
    args = ["study.name=blockwise", "study.tiny=true", "study.blocks=[3]", f"study.out={out}",
            f"data.root={tmp_path}"]  # fmt: skip
    proc = run_study(*args, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {
        (r["method"], r["blocks"]): r
        for r in json.loads((out / "blockwise.json").read_text())["rows"]
    }
    assert sorted(rows, key=str) == sorted(
        [("bp", None), ("sid", 2), ("sid", 3), ("sid", 4)], key=str
    )
    assert rows[("bp", None)]["status"] == "reused"  # same settings: not trained again
    assert "result exists" in rows[("bp", None)]["reason"]
    assert rows[("sid", 3)]["status"] == "ran"
    assert f"data.root={tmp_path}" in rows[("sid", 3)]["command"]
    assert rows[("sid", 2)]["reason"] == "from an earlier invocation"
    md = (out / "blockwise.md").read_text()
    assert "run set 1" in md and "run set 2" in md and "'study.blocks=[3]'" in md
    assert "| digits | mlp (width 256) | SID 3 blocks |" in md
    assert "| digits | mlp (width 256) | SID 4 blocks |" in md
