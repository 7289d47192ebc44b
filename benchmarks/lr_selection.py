"""Per-method learning-rate selection on validation, from accuracy studies run at several lrs.

    python benchmarks/lr_selection.py 3e-4=DIR 1e-3=DIR 3e-3=DIR [1e-4=DIR 1e-2=DIR]
        [--base 3e-4,1e-3,3e-3] [--next --seeds 0,1,2 [--models M,..] [--blocks K,..]]

Each argument is lr=folder of a `sidpipe accuracy` blockwise study (its blockwise.json; a
folder not written yet has no runs). A cell is (model, method, head, blocks). Its lr is chosen
by the best mean validation accuracy (each run's best epoch on validation) over the seeds it
has at every lr it tried, and only once it has tried every lr of --base (default: every lr
given); an exact tie goes to the better mean last-epoch validation, then the smaller lr;
test accuracy never takes part in the choice.

Without --next: two tables. The first: per lr, mean validation / val-selected test accuracy
over those selection seeds; then, at the chosen lr and over every seed run there, the test
accuracy selected on validation and at the last epoch, and the gap to BP when each side uses
its own chosen lr, paired by seed. A chosen lr at the edge of what was tried is marked
"(edge)". The second: every paired difference (local − BP, SID − greedy per head, head −
pool per method) with its per-seed values, a paired t-test and Holm's correction. --plot DIR
also draws, per model, each arm's accuracy against K at its own chosen lr, BP dashed.

With --next: what the study should run next, one line per cell, `LR MODEL METHOD HEAD BLOCKS
SEEDS` (HEAD and BLOCKS are '-' for BP; SEEDS as [a,b]). If the chosen lr is the largest (or
smallest) the cell tried and a larger (smaller) lr is given, the first of --seeds at the next
lr out: the grid extends where the best is at its edge. Otherwise the seeds of --seeds the
cell lacks at its chosen lr. Nothing when every cell is complete. With --calls, the same runs
as `sidpipe accuracy` calls (see calls()). benchmarks/cifar10_convnets.sh (PARTS=heads) runs
seed 0 at every base lr, then what --next --calls says until --next says nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from sidpipe.bench.accuracy.stats import holm, paired_t_p, pct, table

Cell = tuple[str, str, str | None, int | None]  # model, method, head (None: BP), blocks
# (best validation, val-selected test, last-epoch test, last-epoch validation) of one run
Scores = tuple[float, float, float, float]


def cells(studies: dict[str, Path]) -> dict[Cell, dict[str, dict[int, Scores]]]:
    """cell -> lr -> seed -> scores. BP's head is None (it runs the default head); a local
    run without one ran pool. A folder without blockwise.json contributes nothing."""
    out: dict[Cell, dict[str, dict[int, Scores]]] = defaultdict(dict)
    for lr, folder in studies.items():
        path = folder / "blockwise.json"
        if not path.is_file():
            continue
        for r in json.loads(path.read_text())["rows"]:
            if r.get("status") not in ("ran", "reused") or not r.get("val_curve"):
                continue
            head = None if r["method"] == "bp" else r.get("head") or "pool"
            key = (r["model"], r["method"], head, r.get("blocks"))
            out[key].setdefault(lr, {})[r["seed"]] = (
                max(r["val_curve"]),
                r["val_selected_test_accuracy"],
                r.get("test_accuracy", r["val_selected_test_accuracy"]),
                r["val_curve"][-1],
            )
    return out


def selection_seeds(per_lr: dict[str, dict[int, Scores]]) -> set[int]:
    """The seeds a cell has at every lr it tried: the only fair ground for the choice."""
    return set.intersection(*(set(runs) for runs in per_lr.values()))


def choose(data: dict[Cell, dict[str, dict[int, Scores]]], base: list[str]) -> dict[Cell, str]:
    """Each cell's lr, chosen on validation; cells that have not tried every base lr (or
    share no seed across their lrs) have none yet."""
    chosen = {}
    for key, per_lr in data.items():
        seeds = selection_seeds(per_lr)
        if all(lr in per_lr for lr in base) and seeds:
            # validation is counted in 1/400ths here, so exact ties happen: they go to the
            # better last-epoch validation, then the smaller lr, never to the argument order
            chosen[key] = max(
                per_lr,
                key=lambda lr: (
                    statistics.fmean(per_lr[lr][s][0] for s in seeds),
                    statistics.fmean(per_lr[lr][s][3] for s in seeds),
                    -float(lr),
                ),
            )
    return chosen


def by_value(lrs: list[str]) -> list[str]:
    return sorted(lrs, key=float)


def at_edge(per_lr: dict[str, dict[int, Scores]], lr: str) -> bool:
    tried = by_value(list(per_lr))
    return len(tried) > 1 and lr in (tried[0], tried[-1])


def label(key: Cell) -> str:
    method, head = key[1], key[2]
    return method if head in (None, "pool") else f"{method} ({head} head)"


def cells_and_choices(
    studies: dict[str, Path], base: list[str] | None
) -> tuple[dict[Cell, dict[str, dict[int, Scores]]], dict[Cell, str]]:
    """The study rows by cell and each cell's chosen lr (base None: every lr given)."""
    data = cells(studies)
    return data, choose(data, base if base is not None else by_value(list(studies)))


def selection_table(studies: dict[str, Path], base: list[str] | None = None) -> str:
    lrs = by_value(list(studies))
    data, chosen = cells_and_choices(studies, base)
    head = ["model", "method", "K", *[f"lr {lr}: val / test" for lr in lrs], "chosen lr",
            "seeds", "test at chosen lr (val-selected)", "(last epoch)",
            "− BP at BP's chosen lr (val-selected)", "(last epoch)"]  # fmt: skip
    body = []
    for key in sorted(chosen, key=lambda k: (k[0], k[1] != "bp", k[1], k[2] or "", k[3] or 0)):
        model, method, _, blocks = key
        seeds = selection_seeds(data[key])
        per_lr = []
        for lr in lrs:
            runs = [data[key][lr][s] for s in seeds] if lr in data[key] else []
            val = f"{100 * statistics.fmean(r[0] for r in runs):.1f}" if runs else "–"
            test = f"{100 * statistics.fmean(r[1] for r in runs):.1f}" if runs else "–"
            per_lr.append(f"{val} / {test}")
        mine = data[key][chosen[key]]
        gaps = ["–", "–"]
        bp_key = (model, "bp", None, None)
        if method != "bp" and bp_key in chosen:
            bp = data[bp_key][chosen[bp_key]]
            paired = [s for s in mine if s in bp]
            gaps = [pct([mine[s][i] - bp[s][i] for s in paired], signed=True) for i in (1, 2)]
        edge = " (edge)" if at_edge(data[key], chosen[key]) else ""
        body.append([model, label(key), blocks or "–", *per_lr, chosen[key] + edge,
                     ",".join(str(s) for s in sorted(mine)),
                     pct([r[1] for r in mine.values()]),
                     pct([r[2] for r in mine.values()]), *gaps])  # fmt: skip
    return table(head, body)


def paired_table(studies: dict[str, Path], base: list[str] | None = None) -> str:
    """Every comparison the study makes, each side at its own chosen lr, paired by seed:
    each local arm − BP, SID − greedy with the same head, each head − pool for the same
    method. Mean ± std over the paired seeds (val-selected and last-epoch test), the per-seed
    values, the paired t-test's p (val-selected) and whether it survives Holm's correction
    over its family of rows at 0.05: the cells share seeds and the data split, so they are
    compared one by one and never pooled."""
    data, chosen = cells_and_choices(studies, base)
    pairs: list[tuple[str, str, Any, str, Cell, Cell]] = []  # family, model, K, label, a, b
    for key in sorted(chosen, key=lambda k: (k[0], k[3] or 0, k[1], k[2] or "")):
        model, method, head, k = key
        if method == "bp":
            continue
        if (bp := (model, "bp", None, None)) in chosen:
            pairs.append(("− BP", model, k, f"{label(key)} − BP", key, bp))
        if method == "sid" and (greedy := (model, "greedy", head, k)) in chosen:
            pairs.append(("SID − greedy", model, k, f"SID − greedy ({head} head)", key, greedy))
        if head != "pool" and (pool := (model, method, "pool", k)) in chosen:
            pairs.append(("head − pool", model, k, f"{method}: {head} − pool head", key, pool))
    order = {"− BP": 0, "SID − greedy": 1, "head − pool": 2}
    pairs.sort(key=lambda p: (p[1], p[2] or 0, order[p[0]]))  # stable: per cell, by family
    rows = []
    for family, model, k, what, a, b in pairs:
        mine, theirs = data[a][chosen[a]], data[b][chosen[b]]
        seeds = sorted(set(mine) & set(theirs))
        val = [mine[s][1] - theirs[s][1] for s in seeds]
        last = [mine[s][2] - theirs[s][2] for s in seeds]
        rows.append([family, model, k, what, f"{chosen[a]} / {chosen[b]}", val, last,
                     paired_t_p(val)])  # fmt: skip
    survives: dict[int, bool] = {}
    for family in {r[0] for r in rows}:
        tested = [i for i, r in enumerate(rows) if r[0] == family and r[7] is not None]
        survives.update(zip(tested, holm([rows[i][7] for i in tested]), strict=True))
    head_ = ["model", "K", "difference", "lrs", "val-selected", "last epoch",
             "per seed (val-selected)", "p (paired t)", "holds (Holm, 0.05)"]  # fmt: skip
    body = [[model, k, what, lrs, pct(val, signed=True), pct(last, signed=True),
             " / ".join(f"{100 * d:+.1f}" for d in val),
             "–" if p is None else f"{p:.3f}",
             "–" if p is None else ("yes" if survives[i] else "no")]
            for i, (_, model, k, what, lrs, val, last, p) in enumerate(rows)]  # fmt: skip
    return table(head_, body)


def chosen_series(
    studies: dict[str, Path], base: list[str] | None = None
) -> dict[str, tuple[dict[str, tuple[list[float], list[list[float]]]], list[float]]]:
    """Per model: each local arm's val-selected test accuracy against K, every seed run at the
    arm's own chosen lr (x = K, per x the per-seed values), and BP's at its chosen lr."""
    data, chosen = cells_and_choices(studies, base)
    out: dict[str, tuple[dict, list[float]]] = {}
    for key in sorted(chosen, key=lambda k: (k[0], k[1], k[2] or "", k[3] or 0)):
        model, method, _, k = key
        arms, bp = out.setdefault(model, ({}, []))
        runs = [r[1] for r in data[key][chosen[key]].values()]
        if method == "bp":
            bp.extend(runs)
            continue
        xs, ys = arms.setdefault(label(key), ([], []))
        xs.append(float(k))
        ys.append(runs)
    return out


def plot(studies: dict[str, Path], base: list[str] | None, folder: Path) -> list[Path]:
    """One figure per model: accuracy vs K per arm at its chosen lr, BP dashed."""
    from sidpipe.bench.accuracy.plots import plot_lines  # matplotlib only when plotting

    paths = []
    for model, (arms, bp) in chosen_series(studies, base).items():
        path = folder / f"accuracy_vs_k_{model}.png"
        plot_lines(arms, path, "modules K", "test accuracy, val-selected (%)",
                   f"{model}: each method at its own chosen lr (dashed: BP)",
                   hlines={"BP": bp})  # fmt: skip
        paths.append(path)
    return paths


def next_runs(
    studies: dict[str, Path],
    base: list[str],
    seeds: list[int],
    models: list[str] | None = None,
    blocks: list[int] | None = None,
) -> list[str]:
    """What each cell with a chosen lr still needs (see the module docstring)."""
    data = cells(studies)
    given = by_value(list(studies))
    lines = []
    for key, lr in sorted(choose(data, base).items(), key=lambda kv: str(kv[0])):
        model, method, head, k = key
        if models is not None and model not in models:
            continue
        if blocks is not None and method != "bp" and k not in blocks:
            continue
        tried = by_value(list(data[key]))
        i = given.index(lr)
        if lr == tried[-1] and i + 1 < len(given):  # best at the top edge: one step up
            want, run_seeds = given[i + 1], seeds[:1]
        elif lr == tried[0] and i > 0:  # best at the bottom edge: one step down
            want, run_seeds = given[i - 1], seeds[:1]
        else:
            want, run_seeds = lr, [s for s in seeds if s not in data[key][lr]]
        if run_seeds:
            lines.append(f"{want} {model} {method} {head or '-'} {k or '-'} "
                         f"[{','.join(str(s) for s in run_seeds)}]")  # fmt: skip
    return lines


def calls(lines: list[str]) -> list[str]:
    """The --next lines as few `sidpipe accuracy` calls as give exactly those runs, so a study
    runs its runs study.jobs at a time instead of one cell per call. One call per (lr, seeds,
    method) whose (head, K) cells form a full grid, else one per (lr, seeds, method, head); BP
    rides along (study.baseline=true) with the first call of its lr and seeds, or alone.
    Each line: `LR SEEDS METHODS HEADS BLOCKS BASELINE`, lists as [a,b] ([] for BP alone)."""
    groups: dict[tuple[str, str], dict[str, set[tuple[str, int]]]] = {}
    bp: set[tuple[str, str]] = set()
    for line in lines:
        lr, _, method, head, k, seeds = line.split()
        group = groups.setdefault((lr, seeds), {})  # BP alone still makes a call
        if method == "bp":
            bp.add((lr, seeds))
        else:
            group.setdefault(method, set()).add((head, int(k)))
    out = []
    for (lr, seeds), methods in groups.items():
        todo = []
        for method, cells_ in methods.items():
            heads = sorted({h for h, _ in cells_}, key=lambda h: (h != "pool", h))
            blocks = sorted({k for _, k in cells_})
            if len(cells_) == len(heads) * len(blocks):  # a full grid: one call
                todo.append(([method], heads, blocks))
            else:
                for h in heads:
                    todo.append(([method], [h], sorted(k for hh, k in cells_ if hh == h)))
        with_bp = (lr, seeds) in bp
        if not todo:
            todo.append(([], [], []))
        for i, (ms, hs, ks) in enumerate(todo):
            fmt = ",".join
            out.append(f"{lr} {seeds} [{fmt(ms)}] [{fmt(hs)}] [{fmt(str(k) for k in ks)}] "
                       f"{'true' if with_bp and i == 0 else 'false'}")  # fmt: skip
    return out


def csv(kind: type) -> object:
    return lambda text: [kind(x) for x in text.split(",") if x]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lr_selection.py", description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="+", metavar="LR=DIR")
    p.add_argument("--base", type=csv(str), help="lrs every cell must try before choosing")
    p.add_argument("--next", action="store_true", help="print the runs the study needs next")
    p.add_argument("--calls", action="store_true", help="with --next: as study calls")
    p.add_argument("--plot", type=Path, metavar="DIR", help="also draw accuracy vs K into DIR")
    p.add_argument("--seeds", type=csv(int), default=[0, 1, 2])
    p.add_argument("--models", type=csv(str))
    p.add_argument("--blocks", type=csv(int))
    args = p.parse_args(argv)
    if any("=" not in a for a in args.studies):
        p.error("each study is LR=DIR")
    studies = {a.split("=", 1)[0]: Path(a.split("=", 1)[1]) for a in args.studies}
    try:
        for lr in [*studies, *(args.base or [])]:
            float(lr)
    except ValueError as e:
        p.error(f"an lr is not a number: {e}")
    base = args.base if args.base is not None else list(studies)
    if unknown := [lr for lr in base if lr not in studies]:
        p.error(f"--base lists {', '.join(unknown)}, which no LR=DIR gives")
    if args.next:
        lines = next_runs(studies, base, args.seeds, args.models, args.blocks)
        print("\n".join(calls(lines) if args.calls else lines))
        return 0
    for lr in base:
        if not (studies[lr] / "blockwise.json").is_file():
            print(f"lr_selection: error: no blockwise.json in {studies[lr]} (lr {lr})",
                  file=sys.stderr)  # fmt: skip
            return 2
    print(selection_table(studies, base))
    print(
        "\nPaired differences, each side at its own chosen lr (in points; p: paired t-test "
        "over seeds, val-selected; Holm over each family of rows):\n"
    )
    print(paired_table(studies, base))
    for path in plot(studies, base, args.plot) if args.plot else []:
        print(f"\nplot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
