"""benchmarks/lr_selection.py on hand-made study rows: the lr is chosen on validation only,
over the seeds a cell has at every lr; the gap to BP pairs each method's chosen lr with BP's
own; --next extends the grid where the best is at its edge, else asks for the other seeds."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

from sidpipe.bench.accuracy.stats import holm, paired_t_p
from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "lr_selection.py"
spec = importlib.util.spec_from_file_location("lr_selection", SCRIPT)
lr_selection = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lr_selection)


def study(folder: Path, accs: dict[tuple, tuple[float, float]], seeds=(0, 1)) -> Path:
    """blockwise.json with a row per seed per (method, blocks[, head]): (best validation,
    val-selected test); the last-epoch test is 0.05 below the val-selected one."""
    rows = [
        {"status": "ran", "model": "vgg11", "method": m, "blocks": k[0], "seed": s,
         "val_curve": [0.1, val + 0.01 * s], "val_selected_test_accuracy": test + 0.01 * s,
         "test_accuracy": test + 0.01 * s - 0.05, **({"head": k[1]} if len(k) > 1 else {})}
        for (m, *k), (val, test) in accs.items() for s in seeds
    ]  # fmt: skip
    folder.mkdir()
    (folder / "blockwise.json").write_text(json.dumps({"rows": rows}))
    return folder


def test_the_lr_is_chosen_on_validation_and_each_side_uses_its_own(tmp_path) -> None:
    low = study(tmp_path / "low", {("bp", None): (0.60, 0.58), ("sid", 4): (0.50, 0.40)})
    # at the high lr BP's validation is worse but its test better: it must not be chosen
    high = study(tmp_path / "high", {("bp", None): (0.55, 0.62), ("sid", 4): (0.52, 0.45),
                                     ("sid", 8): (0.9, 0.9)})  # fmt: skip
    lines = lr_selection.selection_table({"1e-3": high, "1e-4": low}).splitlines()
    assert len(lines) == 4  # header, rule, BP, SID 4 (SID 8 lacks the low lr: left out)
    assert lines[0].startswith("| model | method | K | lr 1e-4: val / test | lr 1e-3: val")
    assert lines[2] == ("| vgg11 | bp | – | 60.5 / 58.5 | 55.5 / 62.5 | 1e-4 (edge) | 0,1 | "
                        "58.50 ± 0.71 | 53.50 ± 0.71 | – | – |")  # fmt: skip
    # SID chooses 1e-3 (validation 52.5 > 50.5), BP 1e-4: 45.5 - 58.5 per seed
    assert lines[3].endswith("| 1e-3 (edge) | 0,1 | 45.50 ± 0.71 | 40.50 ± 0.71 | "
                             "-13.00 ± 0.00 | -13.00 ± 0.00 |")  # fmt: skip


def test_each_head_chooses_its_own_lr(tmp_path) -> None:
    low = study(tmp_path / "low", {("bp", None): (0.60, 0.58), ("sid", 4, "pool"): (0.50, 0.40),
                                   ("sid", 4, "spatial"): (0.56, 0.50)})  # fmt: skip
    high = study(tmp_path / "high", {("bp", None): (0.55, 0.62), ("sid", 4): (0.52, 0.45),
                                     ("sid", 4, "spatial"): (0.54, 0.52)})  # fmt: skip
    lines = lr_selection.selection_table({"1e-4": low, "1e-3": high}).splitlines()
    assert len(lines) == 5  # header, rule, BP, SID pool (one row has no head: pool), spatial
    pool, spatial = lines[3:]
    assert pool.startswith("| vgg11 | sid | 4 |") and "| 1e-3 (edge) |" in pool
    assert spatial.startswith("| vgg11 | sid (spatial head) | 4 |") and "| 1e-4 (edge) |" in spatial


def test_the_choice_uses_only_seeds_run_at_every_lr(tmp_path) -> None:
    """Seed 1 ran only at the chosen lr (as the study runs it): it must not move the choice,
    but it counts in the accuracy reported at the chosen lr."""
    a = study(tmp_path / "a", {("sid", 4): (0.50, 0.40)}, seeds=(0,))
    b = study(tmp_path / "b", {("sid", 4): (0.52, 0.45)}, seeds=(0,))
    c = study(tmp_path / "c", {("sid", 4): (0.51, 0.50)}, seeds=(0, 1))  # seed 1: 0.52 val
    lines = lr_selection.selection_table({"1e-4": a, "3e-4": b, "1e-3": c}).splitlines()
    assert "| 3e-4 | 0 | 45.00 |" in lines[2]  # 1e-3's mean with seed 1 would be 51.5 < 52
    d = study(tmp_path / "d", {("sid", 4): (0.30, 0.30)}, seeds=(1,))  # no seed in common
    assert len(lr_selection.selection_table({"1e-4": a, "1e-3": d}).splitlines()) == 2


def test_next_extends_the_grid_at_an_edge_then_runs_the_other_seeds(tmp_path) -> None:
    grid = {lr: tmp_path / f"lr-{lr}" for lr in ("1e-4", "3e-4", "1e-3", "3e-3", "1e-2")}
    base = ["3e-4", "1e-3", "3e-3"]
    study(grid["3e-4"], {("bp", None): (0.5, 0.5), ("sid", 4): (0.5, 0.5), ("sid", 8): (0.6, 0.5),
                         ("greedy", 4): (0.4, 0.4)}, seeds=(0,))  # fmt: skip
    study(grid["1e-3"], {("bp", None): (0.6, 0.5), ("sid", 4): (0.6, 0.5), ("sid", 8): (0.5, 0.5)},
          seeds=(0,))  # fmt: skip
    study(grid["3e-3"], {("bp", None): (0.5, 0.5), ("sid", 4): (0.7, 0.5), ("sid", 8): (0.4, 0.5),
                         ("greedy", 4): (0.5, 0.5)}, seeds=(0,))  # fmt: skip
    got = lr_selection.next_runs(grid, base, [0, 1, 2])
    # BP: middle -> the other seeds; SID K=4: top edge -> 1e-2; K=8: bottom edge -> 1e-4;
    # greedy lacks 1e-3: no choice yet
    assert got == ["1e-3 vgg11 bp - - [1,2]", "1e-2 vgg11 sid pool 4 [0]",
                   "1e-4 vgg11 sid pool 8 [0]"]  # fmt: skip
    assert lr_selection.next_runs(grid, base, [0, 1, 2], blocks=[8]) == got[::2]
    assert lr_selection.next_runs(grid, base, [0, 1, 2], models=["resnet18"]) == []
    # 1e-2 is worse than 3e-3 for SID K=4: the seeds run at 3e-3; at 1e-4 K=8 is best again,
    # at the grid's end: its seeds run there
    study(grid["1e-2"], {("sid", 4): (0.65, 0.5)}, seeds=(0,))
    study(grid["1e-4"], {("sid", 8): (0.7, 0.5)}, seeds=(0,))
    got = lr_selection.next_runs(grid, base, [0, 1, 2])
    assert got[1:] == ["3e-3 vgg11 sid pool 4 [1,2]", "1e-4 vgg11 sid pool 8 [1,2]"]


def test_bad_arguments_are_one_line(tmp_path, capsys) -> None:
    assert lr_selection.main([f"1e-3={tmp_path}"]) == 2
    assert f"no blockwise.json in {tmp_path} (lr 1e-3)" in capsys.readouterr().err
    for argv in (["no-equals-sign"], ["fast=x"], [f"1e-3={tmp_path}", "--base", "3e-3"]):
        with pytest.raises(SystemExit) as e:
            lr_selection.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error:" in err
    assert lr_selection.main(["--next", f"1e-3={tmp_path}"]) == 0  # nothing run yet: nothing
    assert capsys.readouterr().out.strip() == ""


def test_paired_t_p_matches_the_textbook_critical_values() -> None:
    """Two-sided 5% critical values of Student's t (any statistics table) give p = 0.05."""
    for df, t in [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (10, 2.228)]:
        n = df + 1
        spread = [(-1.0) ** i for i in range(n)] if n % 2 == 0 else [0.0] + [
            (-1.0) ** i for i in range(n - 1)]  # fmt: skip
        sd = statistics.stdev(spread)
        diffs = [x + t * sd / math.sqrt(n) for x in spread]  # mean / (sd / sqrt n) = t
        assert paired_t_p(diffs) == pytest.approx(0.05, abs=2e-4), df
    assert paired_t_p([0.01, -0.01, 0.0]) == pytest.approx(1.0)
    assert paired_t_p([0.02]) is None  # one pair: no test


def test_holm_steps_down_and_stops_at_the_first_failure() -> None:
    # sorted: 0.01 <= 0.05/4, 0.015 <= 0.05/3, 0.03 > 0.05/2 -> stop; 0.04 fails too
    assert holm([0.03, 0.01, 0.04, 0.015]) == [False, True, False, True]
    assert holm([0.03, 0.01, 0.04, 0.02]) == [False, True, False, False]  # 0.02 > 0.05/3
    assert holm([0.2, 0.01]) == [False, True]
    assert holm([]) == []


def test_the_paired_table_pairs_each_side_at_its_own_lr(tmp_path) -> None:
    seeds = (0, 1, 2)
    low = study(tmp_path / "low", {("bp", None): (0.60, 0.58), ("sid", 4, "pool"): (0.50, 0.40),
                                   ("greedy", 4, "pool"): (0.52, 0.30),
                                   ("sid", 4, "spatial"): (0.40, 0.50)}, seeds)  # fmt: skip
    high = study(tmp_path / "high", {("bp", None): (0.55, 0.62), ("sid", 4, "pool"): (0.52, 0.45),
                                     ("greedy", 4, "pool"): (0.50, 0.20),
                                     ("sid", 4, "spatial"): (0.56, 0.52)}, seeds)  # fmt: skip
    lines = lr_selection.paired_table({"1e-4": low, "1e-3": high}).splitlines()
    assert lines[0].startswith("| model | K | difference | lrs | val-selected |")
    rows = {line.split(" | ")[2]: line for line in lines[2:]}
    # SID pool chose 1e-3 (0.45 test), greedy 1e-4 (0.30): +15 points in every seed, no spread
    sid_greedy = rows["SID − greedy (pool head)"]
    assert (
        "| 1e-3 / 1e-4 | +15.00 ± 0.00 | +15.00 ± 0.00 | +15.0 / +15.0 / +15.0 | 0.000 | yes |"
        in sid_greedy
    )
    # spatial chose 1e-3 (0.52), BP 1e-4 (0.58): -6 points
    assert "| 1e-3 / 1e-4 | -6.00 ± 0.00 |" in rows["sid (spatial head) − BP"]
    assert "| 1e-3 / 1e-3 | +7.00 ± 0.00 |" in rows["sid: spatial − pool head"]
    # the families come in order within a cell: every − BP row, then SID − greedy, then heads
    order = [line.split(" | ")[2] for line in lines[2:]]
    assert order == ["greedy − BP", "sid − BP", "sid (spatial head) − BP",
                     "SID − greedy (pool head)", "sid: spatial − pool head"]  # fmt: skip


def test_a_difference_without_spread_in_one_seed_has_no_test(tmp_path) -> None:
    a = study(tmp_path / "a", {("bp", None): (0.6, 0.6), ("sid", 4): (0.5, 0.5)}, seeds=(0,))
    lines = lr_selection.paired_table({"1e-3": a}).splitlines()
    assert lines[2].endswith("| -10.0 | – | – |")


def test_the_plot_draws_each_arm_at_its_own_lr(tmp_path) -> None:
    low = study(tmp_path / "low", {("bp", None): (0.60, 0.58), ("sid", 4): (0.50, 0.40),
                                   ("sid", 8): (0.60, 0.30)})  # fmt: skip
    high = study(tmp_path / "high", {("bp", None): (0.55, 0.62), ("sid", 4): (0.52, 0.45),
                                     ("sid", 8): (0.50, 0.35)})  # fmt: skip
    studies = {"1e-4": low, "1e-3": high}
    arms, bp = lr_selection.chosen_series(studies)["vgg11"]
    # SID K=4 chose 1e-3 (0.45, 0.46), K=8 chose 1e-4 (0.30, 0.31); BP chose 1e-4
    assert arms == {"sid": ([4.0, 8.0], [[0.45, 0.46], [0.30, 0.31]])}
    assert bp == [0.58, 0.59]
    assert lr_selection.main(["1e-4=" + str(low), "1e-3=" + str(high), "--plot",
                              str(tmp_path / "plots")]) == 0  # fmt: skip
    assert (tmp_path / "plots" / "accuracy_vs_k_vgg11.png").stat().st_size > 1000


def test_a_tie_on_validation_does_not_depend_on_the_argument_order(tmp_path) -> None:
    """Validation accuracy comes in 1/400ths, so two lrs can tie exactly: the better last-epoch
    validation decides, then the smaller lr; never which folder was named first."""

    def one(name: str, best: float, last: float) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        row = {"status": "ran", "model": "vgg11", "method": "sid", "blocks": 4, "seed": 0,
               "val_curve": [last, best, last], "val_selected_test_accuracy": 0.5,
               "test_accuracy": 0.5}  # fmt: skip
        (folder / "blockwise.json").write_text(json.dumps({"rows": [row]}))
        return folder

    a, b = one("a", 0.6175, 0.60), one("b", 0.6175, 0.61)
    for order in ({"1e-3": a, "3e-3": b}, {"3e-3": b, "1e-3": a}):
        assert lr_selection.choose(lr_selection.cells(order), ["1e-3", "3e-3"]) == {
            ("vgg11", "sid", "pool", 4): "3e-3"}  # fmt: skip
    c = one("c", 0.6175, 0.60)  # the same in every way as a: the smaller lr
    for order in ({"1e-3": a, "1e-2": c}, {"1e-2": c, "1e-3": a}):
        assert lr_selection.choose(lr_selection.cells(order), ["1e-3", "1e-2"]) == {
            ("vgg11", "sid", "pool", 4): "1e-3"}  # fmt: skip
