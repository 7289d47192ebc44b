"""The studies' statistics on hand-made rows: mean ± std, paired per-seed differences, the
verdicts against the seed spread, and the findings they turn into."""

from __future__ import annotations

import statistics

import pytest

from sidpipe.bench.accuracy import stats
from sidpipe.bench.accuracy.report import report_blockwise
from sidpipe.bench.accuracy.run import merge, merged_invocations


def row(method: str, seed: int, acc: float, **kw) -> dict:
    return {
        "status": "ran", "method": method, "seed": seed, "dataset": "mnist", "test_accuracy": acc,
        "best_epoch_test_accuracy": acc, "val_selected_test_accuracy": acc,
        "per_depth_accuracy": [acc], "s_per_epoch": 2.0, "epochs": 10, **kw,
    }  # fmt: skip


def test_mean_std_and_percent_cells() -> None:
    m, s = stats.mean_std([0.90, 0.92])
    assert m == pytest.approx(0.91) and s == pytest.approx(0.0141421, rel=1e-4)
    assert stats.mean_std([0.5]) == (0.5, 0.0) and stats.mean_std([]) is None
    assert stats.pct([0.90, 0.92]) == "91.00 ± 1.41"
    assert stats.pct([0.9]) == "90.00" and stats.pct([]) == "–"
    assert stats.pct([-0.012], signed=True) == "-1.20"
    assert stats.runs_cell([row("bp", 0, 0.9), row("bp", 1, 0.9, subset=500)]) == (
        "2 × 10 (subset 500)/10"
    )


def test_paired_differences_match_seeds() -> None:
    a = [row("sid", 0, 0.95), row("sid", 1, 0.96), row("sid", 2, 0.97)]
    b = [row("bp", 0, 0.90), row("bp", 2, 0.93)]  # seed 1 missing: not paired
    assert stats.paired(a, b, "test_accuracy") == pytest.approx([0.05, 0.04])


@pytest.mark.parametrize(
    "diffs, expected",
    [
        ([0.02, 0.03], "above"),
        ([-0.02, -0.025], "below"),
        ([0.0005, -0.0003], "level with"),  # within 0.1 point
        ([0.05, -0.03], "level with"),  # mean +1 point, but the seeds spread 5.7 points
        ([0.002], "above"),  # one seed: the 0.1-point tolerance only
    ],
)
def test_verdict_against_the_seed_spread(diffs, expected) -> None:
    m, v = stats.verdict(diffs)
    assert m == pytest.approx(sum(diffs) / len(diffs)) and v == expected


def test_reference_findings_and_table() -> None:
    rows = [row("bp", 0, 0.990), row("bp", 1, 0.991), row("sid", 0, 0.980), row("sid", 1, 0.979)]
    rows.append({**row("sid", 2, 0.99), "status": "failed"})  # not counted
    body, findings = stats.reference_stats(stats.ok_rows(rows))
    assert [r[:3] for r in body] == [["mnist", "BP", "99.05 ± 0.07"],
                                     ["mnist", "SID (shared)", "97.95 ± 0.07"]]  # fmt: skip
    assert body[0][5] == "99.06" and body[1][5] == "99.31"  # the paper's numbers on MNIST
    assert len(findings) == 3  # last, best, val-selected
    assert "SID − BP = -1.10 points over 2 seed(s): SID is below BP" in findings[0]
    assert "contradicts the paper" in findings[0]
    assert "(paper: 99.31 vs 99.06, +0.25)" in findings[1]


def test_blockwise_gaps_trend_and_count() -> None:
    rows = [row("bp", s, 0.95, model="mlp") for s in (0, 1)]
    rows += [row("sid", s, 0.96, model="mlp", blocks=2) for s in (0, 1)]
    rows += [row("sid", s, 0.90 + 0.001 * s, model="mlp", blocks=4) for s in (0, 1)]
    body, findings, series = stats.blockwise_stats(rows)
    assert [r[2] for r in body] == ["BP", "SID 2 blocks", "SID 4 blocks"]
    assert body[1][6] == "+1.00 ± 0.00" and body[2][6] == "-4.95 ± 0.07"
    assert (
        findings[0].startswith("Blockwise SID is level with or above BP")
        and "in 1 of 2" in (findings[0])
    )
    assert "+1.00 at 2 blocks (above BP), -4.95 at 4 blocks (below BP)" in findings[1]
    assert "falls further behind BP as the network is cut finer" in findings[1]
    xs, ys = series["mnist"]["mlp SID"]
    assert xs == [2, 4] and ys[1] == pytest.approx([-0.05, -0.049])


def test_blockwise_greedy_width_flatness_and_anchors() -> None:
    """greedy rows beside SID, the consistency term's effect per block count, the width in the
    model column, BP's flatness from its validation curve, and the published-anchor table."""
    cifar = {"dataset": "cifar10", "model": "resnet18", "width": 8}
    flat, rising = [0.50, 0.60, 0.65, 0.70, 0.70, 0.705, 0.70, 0.70], [0.3, 0.4, 0.5, 0.6]
    rows = [row("bp", s, 0.70, **cifar, val_curve=flat) for s in (0, 1)]
    rows += [row("sid", s, 0.68, **cifar, blocks=4) for s in (0, 1)]
    rows += [row("greedy", s, 0.66 + 0.01 * s, **cifar, blocks=4) for s in (0, 1)]
    rows += [row("sid", s, 0.60, **cifar, blocks=8) for s in (0, 1)]  # no greedy at 8
    body, findings, series = stats.blockwise_stats(rows)
    assert [r[1:3] for r in body] == [
        ["resnet18 (width 8)", "BP"],
        ["resnet18 (width 8)", "SID 4 blocks"],
        ["resnet18 (width 8)", "SID 8 blocks"],
        ["resnet18 (width 8)", "greedy (α=1) 4 blocks"],
    ]
    assert body[3][7] == "-3.50 ± 0.71"  # greedy − BP, val-selected
    assert any("changed -0.50 points over the last quarter of its 8 epochs (flat" in f
               for f in findings)  # fmt: skip
    line = next(f for f in findings if f.startswith("Consistency term"))
    assert "SID − greedy (α=1), val-selected test accuracy, +1.50 at 4 blocks (above)" in line
    assert "8 blocks" not in line  # only block counts where both methods ran
    assert set(series["cifar10"]) == {"resnet18 (width 8) SID", "resnet18 (width 8) greedy (α=1)"}

    rows[0]["val_curve"] = rows[1]["val_curve"] = rising
    _, findings, _ = stats.blockwise_stats(rows)
    assert any("+10.00 points" in f and "NOT flat" in f for f in findings)
    # an lr annealed to 0 flattens any run's end: a flat verdict then says it proves little
    for r in rows[:2]:
        r.update(val_curve=flat, schedule="cosine")
    caveat = "only a run with more epochs shows whether it converged"
    assert any("(flat; but its lr decays to 0 (cosine)" in f and caveat in f
               for f in stats.blockwise_stats(rows)[1])  # fmt: skip
    rows[0]["val_curve"] = rows[1]["val_curve"] = rising
    assert not any(caveat in f for f in stats.blockwise_stats(rows)[1])

    header, anchors = stats.anchor_table(rows)
    assert header[3:] == [
        "SID − BP (this study)",
        "greedy (α=1) − BP (this study)",
        "greedy (DGL-style) − BP (published)",
        "InfoPro − BP (published)",
    ]
    assert anchors == [
        ["cifar10", "resnet18 (width 8)", 4, "-2.00 ± 0.00", "-3.50 ± 0.71", "-4.0", "-1.2"],
        ["cifar10", "resnet18 (width 8)", 8, "-10.00 ± 0.00", "–", "-7.0", "-3.8"],
    ]  # fmt: skip


def test_consistency_term_pooled_over_cells() -> None:
    """Per cell, three seeds leave a 1-point SID − greedy edge 'level with' the spread; pooled
    over the four (model, blocks) cells its 12 pairs are all positive."""
    rows = []
    for model in ("resnet18", "vgg11"):
        cifar = {"dataset": "cifar10", "model": model, "width": 8}
        rows += [row("bp", s, 0.60, **cifar) for s in range(3)]
        for blocks in (4, 8):
            for s, gain in enumerate((0.001, 0.025, 0.004)):
                rows.append(row("greedy", s, 0.50 - 0.01 * s, **cifar, blocks=blocks))
                rows.append(row("sid", s, 0.50 - 0.01 * s + gain, **cifar, blocks=blocks))
    rows.append(row("sid", 0, 0.4, dataset="cifar10", model="vgg11", width=8, blocks=2))
    _, findings, _ = stats.blockwise_stats(rows)
    per_cell = [f for f in findings if f.startswith("Consistency term (")]
    assert len(per_cell) == 2 and all("+1.00 at 4 blocks (level with)" in f for f in per_cell)
    pooled = [f for f in findings if f.startswith("Consistency term pooled")]
    assert len(pooled) == 1
    # mean ± std of the pairs' gains in points; no test: the pairs share seeds and the split
    gains = [0.1, 2.5, 0.4]
    sd12, sd6 = statistics.stdev(gains * 4), statistics.stdev(gains * 2)
    assert f"all (4 cells, 12 pairs) +1.00 ± {sd12:.2f}, SID ahead in 12, behind in 0" in pooled[0]
    assert "descriptive only" in pooled[0] and "p =" not in pooled[0]
    assert f"4 blocks (2 cells, 6 pairs) +1.00 ± {sd6:.2f}," in pooled[0]
    assert "2 blocks" not in pooled[0]  # no greedy at 2 blocks: not a pair
    # one cell only: nothing to pool, the per-cell line says it all
    one = [r for r in rows if r["model"] == "vgg11" and r.get("blocks") in (None, 4)]
    assert not [f for f in stats.blockwise_stats(one)[1] if "pooled" in f]


def test_noise_drop_from_clean() -> None:
    rows = []
    for s in (0, 1):
        rows += [row("bp", s, 0.95, arch="shared", noise=0.0),
                 row("sid", s, 0.95, arch="shared", noise=0.0),
                 row("bp", s, 0.80, arch="shared", noise=0.4),
                 row("sid", s, 0.90, arch="shared", noise=0.4)]  # fmt: skip
    body, findings, series = stats.noise_stats(rows)
    assert len(body) == 4 and body[-1][3] == "SID" and body[-1][8] == "-5.00 ± 0.00"
    assert "Noise 40% (mnist, shared), last epoch" in findings[0]
    assert "SID is above BP" in findings[0] and "SID loses less" in findings[0]
    assert series[("shared", "mnist")]["SID"][0] == [0.0, 40.0]


def test_depth_monotone_counts() -> None:
    rising = row("sid", 0, 0.9, group="g", per_depth_accuracy=[0.5, 0.7, 0.9])
    dip = row("sid", 1, 0.8, group="g", per_depth_accuracy=[0.5, 0.9, 0.8])
    body, findings, groups = stats.depth_stats({"blockwise": {"rows": [rising, dip]}})
    assert body[0][2] == "50.0 → 80.0 → 85.0" and body[0][3] == "1/2" and body[0][5] == "3/3"
    assert "never falls from one module to the next in 1 of 2 SID runs" in findings[0]
    assert "does not hold in 1 run(s)" in findings[0]
    assert groups == [("blockwise", "g", [rising, dip])]


def test_merge_keeps_other_configurations_and_drops_superseded(tmp_path) -> None:
    def done(name: str, group: str, **kw) -> dict:
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text("{}")
        return {**row("sid", 0, 0.9, **kw), "name": name, "group": group, "run_dir": name}

    old = {"rows": [done("b2-e5", "b2-e5", blocks=2), done("b4-e5", "b4-e5", blocks=4)]}
    new = [{**row("sid", 0, 0.9, blocks=4), "name": "b4-e10", "group": "b4-e10"}]
    merged = merge(old, new, tmp_path)
    assert [r["name"] for r in merged] == ["b4-e10", "b2-e5"]  # b4 at 5 epochs: superseded
    assert merged[1]["reason"] == "from an earlier invocation"


def test_a_reused_run_keeps_the_invocation_that_trained_it(tmp_path) -> None:
    (tmp_path / "b4").mkdir()
    (tmp_path / "b4" / "summary.json").write_text("{}")
    trained = {**row("sid", 0, 0.9, blocks=4), "name": "b4", "group": "b4", "run_dir": "b4"}
    old = {"rows": [{**trained, "invocation": "monday"}], "invocations": {"monday": {}}}
    again = [{**trained, "status": "reused", "invocation": "tuesday"},  # found finished
             {**row("sid", 1, 0.9, blocks=4), "name": "b4-s1", "group": "b4",
              "run_dir": "b4-s1", "invocation": "tuesday"}]  # fmt: skip
    merged = merge(old, again, tmp_path)
    assert [(r["name"], r["invocation"]) for r in merged] == [("b4", "monday"),
                                                             ("b4-s1", "tuesday")]  # fmt: skip
    assert set(merged_invocations(old, merged, {"id": "tuesday"})) == {"monday", "tuesday"}


def test_heads_are_shown_and_every_paired_difference_per_cell() -> None:
    """A study that ran two heads names them in every table and compares them per cell, for
    val-selected and last-epoch test accuracy, with the per-seed values."""
    cifar = {"dataset": "cifar10", "model": "resnet18", "width": 8}
    rows = [row("bp", s, 0.60, **cifar) for s in range(3)]
    for s in range(3):
        rows.append(row("sid", s, 0.50, **cifar, blocks=4, head="pool"))
        rows.append(row("greedy", s, 0.49, **cifar, blocks=4, head="pool"))
        rows.append(row("sid", s, 0.55 + 0.01 * s, **cifar, blocks=4, head="spatial"))
        rows.append(row("greedy", s, 0.53, **cifar, blocks=4, head="spatial"))
    rows[-1]["test_accuracy"] = 0.40  # greedy spatial, seed 2: a poor last epoch only
    body, findings, series = stats.blockwise_stats(rows)
    assert [r[2] for r in body] == ["BP", "SID, pool head 4 blocks", "SID, spatial head 4 blocks",
                                    "greedy (α=1), pool head 4 blocks",
                                    "greedy (α=1), spatial head 4 blocks"]  # fmt: skip
    assert any(f.startswith("Consistency term (resnet18 (width 8) on cifar10, spatial head)")
               for f in findings)  # fmt: skip
    assert "resnet18 (width 8) SID, spatial head" in series["cifar10"]
    header, diffs = stats.paired_table(rows)
    assert header[4:6] == ["val-selected", "last epoch"]
    got = {r[3]: r[4:] for r in diffs}
    assert list(got) == [
        "SID, pool head − BP", "SID, spatial head − BP", "greedy (α=1), pool head − BP",
        "greedy (α=1), spatial head − BP", "SID − greedy (pool head)",
        "SID − greedy (spatial head)", "SID: spatial − pool head",
        "greedy (α=1): spatial − pool head",
    ]  # fmt: skip
    assert got["SID: spatial − pool head"] == ["+6.00 ± 1.00", "+6.00 ± 1.00", "+5.0 / +6.0 / +7.0"]
    # the val-selected and last-epoch columns come from their own accuracies
    greedy_spatial = got["greedy (α=1): spatial − pool head"]
    assert greedy_spatial[0] == "+4.00 ± 0.00" and greedy_spatial[1] != greedy_spatial[0]
    header, anchors = stats.anchor_table(rows)
    assert "SID, spatial head − BP (this study)" in header


def test_blockwise_report_shows_the_paired_table_and_the_heads(tmp_path) -> None:
    cifar = {"dataset": "cifar10", "model": "vgg11", "width": 8}
    rows = [row("bp", s, 0.60, **cifar) for s in range(2)]
    rows += [row("sid", s, 0.58, **cifar, blocks=2, head=h) for s in range(2)
             for h in ("pool", "conv")]  # fmt: skip
    meta = {"command": "sidpipe accuracy", "date": "d", "extra": [],
            "machine": {"platform": "p", "processor": "x", "cpus": "2", "torch": "t"},
            "knobs": {"epochs": 1, "seeds": [0, 1], "batch_size": 8, "val_fraction": 0.1,
                      "subset": None, "threads": 1, "jobs": 1}}  # fmt: skip
    md = report_blockwise(rows, [meta], tmp_path).markdown
    assert "### Paired differences per cell" in md
    assert "| cifar10 | vgg11 (width 8) | 2 | SID: conv − pool head | +0.00 ± 0.00 |" in md
    assert "SID, conv head 2 blocks" in md
