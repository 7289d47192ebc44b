"""Per-method learning-rate selection on validation, from accuracy studies run at several lrs.

    python benchmarks/lr_selection.py 1e-3=OUT 3e-4=OUT/lr-3e-4 3e-3=OUT/lr-3e-3

Each argument is lr=folder of a `sidpipe accuracy` blockwise study (its blockwise.json). For
every (model, method, blocks) cell the lr with the best mean validation accuracy (each run's
best epoch on validation) is chosen; the table gives, per lr, mean validation and
val-selected test accuracy, and the gap to BP when each side uses its own chosen lr, paired
by seed. Test accuracy never takes part in the choice.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from sidpipe.bench.accuracy.stats import pct, table


def cells(studies: dict[str, Path]) -> dict[tuple, dict[str, dict[int, tuple[float, float]]]]:
    """(model, method, blocks) -> lr -> seed -> (best validation, val-selected test)."""
    out: dict[tuple, dict[str, dict[int, tuple[float, float]]]] = defaultdict(dict)
    for lr, folder in studies.items():
        rows = json.loads((folder / "blockwise.json").read_text())["rows"]
        for r in rows:
            if r.get("status") not in ("ran", "reused") or not r.get("val_curve"):
                continue
            key = (r["model"], r["method"], r.get("blocks"))
            out[key].setdefault(lr, {})[r["seed"]] = (
                max(r["val_curve"]),
                r["val_selected_test_accuracy"],
            )
    return out


def selection_table(studies: dict[str, Path]) -> str:
    data = cells(studies)
    lrs = list(studies)
    # only cells measured at every lr take part: the choice must see the same options
    full = {k: v for k, v in data.items() if all(lr in v for lr in lrs)}
    chosen = {
        k: max(lrs, key=lambda lr: statistics.fmean(a for a, _ in v[lr].values()))
        for k, v in full.items()
    }
    head = ["model", "method", "K", *[f"lr {lr}: val / test" for lr in lrs], "chosen lr",
            "test at chosen lr", "− BP at BP's chosen lr"]  # fmt: skip
    body = []
    for key in sorted(full, key=lambda k: (k[0], k[1] != "bp", k[1], k[2] or 0)):
        model, method, blocks = key
        per_lr = []
        for lr in lrs:
            runs = full[key][lr].values()
            val = 100 * statistics.fmean(a for a, _ in runs)
            test = 100 * statistics.fmean(t for _, t in runs)
            per_lr.append(f"{val:.1f} / {test:.1f}")
        mine = full[key][chosen[key]]
        gap = "–"
        bp_key = (model, "bp", None)
        if method != "bp" and bp_key in full:
            bp = full[bp_key][chosen[bp_key]]
            gap = pct([mine[s][1] - bp[s][1] for s in mine if s in bp], signed=True)
        body.append([model, method, blocks or "–", *per_lr, chosen[key],
                     pct([t for _, t in mine.values()]), gap])  # fmt: skip
    return table(head, body)


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    studies = {a.split("=", 1)[0]: Path(a.split("=", 1)[1]) for a in argv}
    for lr, folder in studies.items():
        if not (folder / "blockwise.json").is_file():
            print(f"lr_selection: error: no blockwise.json in {folder} (lr {lr})", file=sys.stderr)
            return 2
    print(selection_table(studies))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
