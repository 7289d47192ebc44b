"""Bits per byte at equal training tokens: SID dense / SID top-k / single-process BP, over
vocabularies (bytes, BPE) and two model depths, on Shakespeare.

Every run is `sidpipe train experiment=lm_small pipeline.stages=1` (one process: the SID
pipeline computes the same parameters bit for bit, and BP pipelines equal single-process BP,
tests/test_lm.py), with the same steps, batch, lr and seed list; only the tokenizer, the
depth, the method and pipeline.belief_topk change. A run whose summary.json exists is
skipped, so the grid can be stopped and restarted; so is one already recorded in the
`--done` file (a summarize's bpb_grid.json), whose run directory may be gone.

Usage (repository root; SIDPIPE_DATA must hold shakespeare/):
  python benchmarks/lm_bpb_grid.py run OUT [--steps 50] [--seeds 0,1] [--only v8192]
      [--skip v8192] [--wrap /tmp/shared] [--pause-file F] [--done JSON] [--dry-run]
  python benchmarks/lm_bpb_grid.py summarize OUT --to DIR   # DIR/bpb_grid.json, .md

`--only` / `--skip` keep or drop runs whose name contains any of the comma-separated
words (e.g. --only v8192 for one worker, --skip v8192 for another). `--wrap` prefixes each
command (a lock wrapper); while `--pause-file` exists no new run starts (a timing
measurement can then take the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["experiment=lm_small", "pipeline.stages=1", "pipeline.threads=1", "progress=false",
          "data.val_fraction=0.02", "train.eval_batch_size=16", "train.log_every=10"]  # fmt: skip
MODELS = {"d4": [], "d8": ["model.depth=8", "model.blocks=4"]}
# (name, overrides) in priority order: the runs the goal checks need come first.
# sid-kN: top-N beliefs (the default sid.topk_consistency=even); sid-k32-partition: the
# consistency term on what was sent only (method/loss.py), measured at V = 8,192 against it.
METHODS = [("sid-dense", []), ("sid-k32", ["pipeline.belief_topk=32"]),
           ("bp", ["method=bp", "pipeline.microbatches=1"]),
           ("sid-k8", ["pipeline.belief_topk=8"]),
           ("sid-k32-partition", ["pipeline.belief_topk=32", "sid.topk_consistency=partition"]),
           ("sid-k128", ["pipeline.belief_topk=128"])]  # fmt: skip
VOCABS = (8192, 256, 2048)


def tokenizer(v: int) -> list[str]:
    return ["data.tokenizer=bytes"] if v == 256 else ["data.tokenizer=bpe", f"data.vocab_size={v}"]


def plan(steps: int, seeds: list[int]) -> list[tuple[str, list[str]]]:
    """Every run of the grid, most needed first: depth 4 before depth 8, k=128 last."""
    runs = []
    for model in MODELS:
        for v in VOCABS:
            for method, extra in METHODS:
                d8_skips = ("sid-k8", "sid-k32-partition")
                if method == "sid-k128" or (model == "d8" and method in d8_skips):
                    continue
                for seed in seeds:
                    runs.append((f"v{v}-{model}-{method}-s{seed}",
                                 [*COMMON, *MODELS[model], *tokenizer(v), *extra,
                                  f"train.max_steps={steps}", f"seed={seed}"]))  # fmt: skip
    for model in MODELS:  # the largest k last: it does not meet the bytes goal at d = 128
        for v in VOCABS:
            for seed in seeds:
                runs.append((f"v{v}-{model}-sid-k128-s{seed}",
                             [*COMMON, *MODELS[model], *tokenizer(v), "pipeline.belief_topk=128",
                              f"train.max_steps={steps}", f"seed={seed}"]))  # fmt: skip
    return runs


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    only = [w for w in args.only.split(",") if w] if args.only else []
    skip = [w for w in args.skip.split(",") if w] if args.skip else []
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = [
        (n, o)
        for n, o in plan(args.steps, seeds)
        if (not only or any(w in n for w in only)) and not any(w in n for w in skip)
    ]
    wrap = args.wrap.split() if args.wrap else []
    done = set(json.loads(Path(args.done).read_text())["runs"]) if args.done else set()
    for name, overrides in todo:
        if (out / name / "summary.json").exists() or name in done:
            continue
        cmd = [*wrap, sys.executable, "-m", "sidpipe.cli", "train", *overrides,
               f"hydra.run.dir={out / name}"]  # fmt: skip
        print(" ".join(cmd), flush=True)
        if args.dry_run:
            continue
        while args.pause_file and Path(args.pause_file).exists():
            time.sleep(5)
        t0 = time.time()
        rc = subprocess.call(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        print(f"{name}: rc {rc}, {time.time() - t0:.0f} s", flush=True)


def paired(rows: dict, names: list[str], other: str) -> float | None:
    """Mean over seeds of (this run - the other group's run of the same seed): the same seed
    gives the same initial blocks and the same training windows, so the seed's own noise
    cancels. None when no seed has both."""
    diffs = [rows[n]["val_bpb_per_depth"][-1] - rows[o]["val_bpb_per_depth"][-1]
             for n in names if (o := f"{other}-s{rows[n]['seed']}") in rows]  # fmt: skip
    return statistics.mean(diffs) if diffs else None


def summarize(args: argparse.Namespace) -> None:
    # Rows recorded by an earlier summarize are kept: a grid spans sessions, and a run's
    # directory (checkpoints, logs) may be gone once its row is in the record. A run
    # directory that exists now replaces its recorded row.
    record = Path(args.to) / "bpb_grid.json"
    rows = json.loads(record.read_text())["runs"] if record.exists() else {}
    for s in sorted(Path(args.out).glob("*/summary.json")):
        d = json.loads(s.read_text())
        rows[s.parent.name] = {k: d.get(k) for k in (
            "method", "seed", "steps", "val_bpb_per_depth", "per_depth_bpb", "test_bpb",
            "text_bytes_per_token", "train_s", "tokens_per_s")}  # fmt: skip
        rows[s.parent.name]["overrides"] = (
            (s.parent / ".hydra" / "overrides.yaml").read_text()
            if (s.parent / ".hydra" / "overrides.yaml").exists()
            else None
        )
    groups: dict[str, list[str]] = {}
    for name in rows:
        groups.setdefault(name.rsplit("-s", 1)[0], []).append(name)
    lines = ["| V | model | method | seeds | val bpb, last module (per seed) | mean val bpb "
             "| - dense SID (paired by seed) | - BP (paired) | val bpb per depth (mean) "
             "| train tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    means = {g: statistics.mean(rows[n]["val_bpb_per_depth"][-1] for n in ns)
             for g, ns in groups.items()}  # fmt: skip
    table = []
    for g, ns in sorted(groups.items(), key=lambda kv: (int(kv[0].split("-")[0][1:]), kv[0])):
        v, model, method = g.split("-", 2)
        dense, bp = f"{v}-{model}-sid-dense", f"{v}-{model}-bp"
        depth = [statistics.mean(x) for x in zip(*(rows[n]["val_bpb_per_depth"] for n in ns))]
        d_dense = paired(rows, ns, dense) if method != "bp" else None
        d_bp = paired(rows, ns, bp)
        tokens = rows[ns[0]]["steps"] * 32 * 128 if rows[ns[0]]["steps"] else None
        table.append({"group": g, "vocab": int(v[1:]), "model": model, "method": method,
                      "seeds": [rows[n]["seed"] for n in ns], "val_bpb_mean": means[g],
                      "val_bpb": [rows[n]["val_bpb_per_depth"][-1] for n in ns],
                      "minus_dense_paired": d_dense, "minus_bp_paired": d_bp,
                      "val_bpb_per_depth": depth,
                      "train_tokens": tokens})  # fmt: skip
        fmt = lambda x: "-" if x is None else f"{x:+.3f}"  # noqa: E731
        per_seed = " / ".join(f"{rows[n]['val_bpb_per_depth'][-1]:.3f}" for n in ns)
        lines.append(f"| {v[1:]} | {model} | {method} | {len(ns)} | {per_seed} | "
                     f"{means[g]:.3f} | {fmt(d_dense)} | {fmt(d_bp)} | "
                     f"{' '.join(f'{x:.3f}' for x in depth)} | {tokens} |")  # fmt: skip
    to = Path(args.to)
    to.mkdir(parents=True, exist_ok=True)
    (to / "bpb_grid.json").write_text(json.dumps({"groups": table, "runs": rows}, indent=1))
    (to / "bpb_grid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out")
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--seeds", default="0,1")
    r.add_argument("--only", default="")
    r.add_argument("--skip", default="")
    r.add_argument("--wrap", default="")
    r.add_argument("--pause-file", default="")
    r.add_argument("--done", default="", help="a bpb_grid.json whose runs are not rerun")
    r.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("summarize")
    s.add_argument("out")
    s.add_argument("--to", required=True)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(args) if args.cmd == "run" else summarize(args)


if __name__ == "__main__":
    main()
