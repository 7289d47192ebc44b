"""Collect the runs of run_quality.sh / run_bf16.sh into quality.md and runs/*.json.

Usage (repository root): .venv/bin/python benchmarks/results/lm-2026-12-01/summarize.py RUNS_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(runs: Path) -> dict[str, dict]:
    out = {}
    for s in sorted(runs.glob("*/summary.json")):
        d = json.loads(s.read_text())
        out[s.parent.name] = d
        keep = {k: d[k] for k in ("method", "stages", "seed", "test_bpb", "per_depth_bpb",
                                  "val_bpb_per_depth", "test_accuracy", "per_depth_accuracy",
                                  "tokens_per_s", "train_s", "wall_s", "steps", "evaluations",
                                  "per_stage", "config") if k in d}  # fmt: skip
        (HERE / "runs").mkdir(exist_ok=True)
        (HERE / "runs" / f"{s.parent.name}.json").write_text(json.dumps(keep, indent=1))
    return out


def fmt(xs: list[float]) -> str:
    return " ".join(f"{x:.3f}" for x in xs)


def main() -> None:
    runs = load(Path(sys.argv[1]))
    lines = [
        "| run | method | K | seed | val bpb per depth | test bpb per depth | test bpb (last) "
        "| next-byte acc (last) | train s | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in runs.items():
        k = len(d["per_depth_bpb"]) if d["method"] == "sid" else "-"
        lines.append(
            f"| {name} | {d['method']} | {k} | {d['seed']} | {fmt(d['val_bpb_per_depth'])} "
            f"| {fmt(d['per_depth_bpb'])} | {d['test_bpb']:.3f} | {d['test_accuracy']:.3f} "
            f"| {d['train_s']:.0f} | {d['tokens_per_s']:.0f} |"
        )
    groups: dict[str, list[float]] = {}
    for name, d in runs.items():
        key = name.rsplit("-s", 1)[0] if "bf16" not in name else name
        groups.setdefault(key, []).append(d["val_bpb_per_depth"][-1])
    lines += ["", "| group | mean val bpb (last module) | seeds |", "|---|---|---|"]
    for key, vals in groups.items():
        lines.append(f"| {key} | {statistics.mean(vals):.3f} | {len(vals)} |")
    (HERE / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
