"""The accuracy-study harness (benchmarks/accuracy.py) on its tiny CI configuration.

One subprocess runs every study with `tiny=true` (digits, 1 epoch, seed 0, mlp, blocks
[2, 4]); the checks read the tables, JSON rows and plots it leaves. A second call with one
more block count must reuse the finished BP run, train only the new one, and keep the
earlier rows in the merged table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accuracy.py"
STUDIES = ("reference", "blockwise", "noise", "alpha")
PNG = b"\x89PNG\r\n\x1a\n"


def run_script(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def load_module():
    spec = importlib.util.spec_from_file_location("accuracy_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def expected_depths(row: dict) -> int:
    if row["method"] == "bp":
        return 1  # BP predicts with the last head only
    return 5 if row["variant"] == "shared" else row["blocks"]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("accuracy")
    proc = run_script("study=all", "tiny=true", f"out={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_tables_rows_and_plots(tiny_results: Path) -> None:
    out = tiny_results
    command = f"study=all tiny=true out={out}"
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
        md = (out / f"{study}.md").read_text()
        assert command in md and "seeds: [0]; epochs: 1" in md and "machine:" in md, study
        assert "| method |" in md or "| method " in md
        assert result["plots"], study
        for plot in result["plots"]:
            assert (out / plot).read_bytes()[:8] == PNG, plot

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
    assert "- Blockwise mlp on digits: SID − BP" in summary


def test_rerun_reuses_and_merges(tiny_results: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(tiny_results, out)
    proc = run_script("study=blockwise", "tiny=true", "blocks=[3]", f"out={out}", timeout=90)
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
    assert rows[("sid", 2)]["reason"] == "from an earlier invocation"
    md = (out / "blockwise.md").read_text()
    assert "run set 1" in md and "run set 2" in md and "blocks=[3]" in md
    assert "| digits | mlp | SID 3 blocks |" in md and "| digits | mlp | SID 4 blocks |" in md


def test_plan_and_usage_errors(capsys) -> None:
    acc = load_module()
    assert acc.main(["study=bogus"]) == 2
    assert acc.main(["study=blockwise", "tiny=true", "seeds=x"]) == 2
    code = acc.main(["study=blockwise", "models=[simplecnn]", "blocks=[2,8]", "seeds=[0,1]",
                     "datasets=[mnist]", "plan=true"])  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# blockwise: 6 runs"
    skipped = [line for line in lines if "SKIP" in line]
    assert len(skipped) == 2 and all("4 natural layers" in line for line in skipped)
    assert sum("method=bp" in line for line in lines) == 2  # one BP run per seed
