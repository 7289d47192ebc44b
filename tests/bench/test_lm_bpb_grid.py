"""benchmarks/lm_bpb_grid.py: the grid's record survives its run directories, and a
recorded run is not trained again."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_bpb_grid.py"
_spec = importlib.util.spec_from_file_location("lm_bpb_grid", SCRIPT)
grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grid)


def _summary(run: Path, method: str, seed: int, bpb: float) -> None:
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "method": method, "seed": seed, "steps": 50, "val_bpb_per_depth": [bpb + 0.1, bpb],
        "test_bpb": bpb, "train_s": 1.0}))  # fmt: skip


def _grid(*args: str) -> str:
    """The script's command line, in this process (a dry run starts no training)."""
    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [str(SCRIPT), *args])
        mp.setattr("builtins.print", lambda *a, **k: out.append(" ".join(map(str, a))))
        grid.main()
    return "\n".join(out)


def test_summarize_keeps_recorded_rows_and_replaces_rerun_ones(tmp_path):
    runs, to = tmp_path / "runs", tmp_path / "record"
    _summary(runs / "v256-d4-sid-dense-s0", "sid", 0, 3.0)
    _summary(runs / "v256-d4-bp-s0", "bp", 0, 3.5)
    _grid("summarize", str(runs), "--to", str(to))
    # the directories are gone; a later grid adds seed 1 and reruns BP seed 0
    for d in runs.iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    _summary(runs / "v256-d4-sid-dense-s1", "sid", 1, 2.0)
    _summary(runs / "v256-d4-bp-s0", "bp", 0, 3.25)
    _grid("summarize", str(runs), "--to", str(to))
    record = json.loads((to / "bpb_grid.json").read_text())
    assert sorted(record["runs"]) == ["v256-d4-bp-s0", "v256-d4-sid-dense-s0",
                                      "v256-d4-sid-dense-s1"]  # fmt: skip
    assert record["runs"]["v256-d4-bp-s0"]["val_bpb_per_depth"][-1] == 3.25
    dense = next(g for g in record["groups"] if g["group"] == "v256-d4-sid-dense")
    assert dense["val_bpb"] == [3.0, 2.0]
    assert dense["minus_bp_paired"] == 3.0 - 3.25  # only seed 0 has both


def test_run_skips_what_the_record_holds(tmp_path):
    record = tmp_path / "bpb_grid.json"
    record.write_text(json.dumps({"groups": [], "runs": {"v8192-d4-bp-s0": {}}}))
    planned = _grid("run", str(tmp_path / "out"), "--only", "v8192-d4-bp", "--dry-run")
    assert "v8192-d4-bp-s0" in planned and "v8192-d4-bp-s1" in planned
    left = _grid("run", str(tmp_path / "out"), "--only", "v8192-d4-bp", "--dry-run",
                 "--done", str(record))  # fmt: skip
    assert "v8192-d4-bp-s0" not in left and "v8192-d4-bp-s1" in left
