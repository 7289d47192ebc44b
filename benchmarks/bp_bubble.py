"""Measured bubble of the BP pipelines (GPipe, 1F1B) next to the textbook (S-1)/(M+S-1).

For S=2 and M in {2, 4, 8} (batch fixed, so microbatches shrink as M grows) this runs, through
the real CLI, one BP pipeline per (schedule, M) and the single-process BP reference with the
same gradient accumulation, 1 thread per process, evaluation off, a trace on. It reports:

  samples/s    steady state: batches after the warm-up, timed on the last stage's trace
  efficiency   pipeline samples/s / (S x single-process samples/s)
  bubble s     idle share of schedule.step on stage s, from the second step on (the runner's
               `bubble_fraction`: 1 - (forward + backward + loss time) / schedule.step time)
  F+B s        forward + backward + loss milliseconds per step on stage s (balance check)

    .venv/bin/python benchmarks/bp_bubble.py [--steps 30] [--out benchmarks/results/X.md]

The workload defaults to an MLP (width 1024, 6 layers, linear heads) on MNIST cut 3+3, whose
two stages cost about the same; the textbook figure assumes equal stages and free messages.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SIDPIPE_DATA", REPO.parent / "shared" / "data"))
COMPUTE = ("forward", "backward", "loss")


def workload(batch: int) -> list[str]:
    data = "mnist" if (DATA / "MNIST" / "raw").exists() else "digits"
    return [
        f"data={data}",
        f"data.root={DATA}",
        "model=mlp",
        "model.width=1024",
        "model.depth=6",
        "model.head_hidden=0",
        f"train.batch_size={batch}",
        "train.epochs=1000",
        "train.eval_every_epoch=false",
        "train.final_eval=false",
        "train.log_every=1000000",
        "pipeline.threads=1",
        "pipeline.timeout_s=300",
        "pipeline.trace=true",
        "progress=false",
        "method=bp",
    ]


def run(args: list[str], run_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sidpipe.cli", "train", *args, f"hydra.run.dir={run_dir}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def steady(run_dir: Path, warmup: int) -> tuple[float, list[float], int]:
    """(samples/s after the warm-up on the last stage, per-stage F+B ms per step, steps)."""
    trace = json.loads((run_dir / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    stages = sorted({e["tid"] for e in spans})
    sink = sorted((e for e in spans if e["tid"] == stages[-1] and e["name"] == "train"),
                  key=lambda e: e["ts"])  # fmt: skip
    timed = sink[warmup:]
    t0 = sink[warmup - 1]["ts"] + sink[warmup - 1]["dur"]
    t1 = timed[-1]["ts"] + timed[-1]["dur"]
    rate = sum(e["args"]["n"] for e in timed) / ((t1 - t0) / 1e6)
    per_step = []
    for s in stages:
        busy = sum(e["dur"] for e in spans if e["tid"] == s and e["name"] in COMPUTE
                   and t0 <= e["ts"] < t1)  # fmt: skip
        per_step.append(busy / 1e3 / len(timed))
    return rate, per_step, len(timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--partition", default="[3]", help="pipeline.partition for S=2")
    p.add_argument("--repeats", type=int, default=1, help="runs per case; the median is kept")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    s = a.stages
    base = [*workload(a.batch), f"train.max_steps={a.steps}"]
    rows = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bp-bubble-") as tmp:
        for m in a.microbatches:
            seq_rates = []
            for k in range(a.repeats):
                seq_dir = Path(tmp) / f"seq-M{m}-{k}"
                run([*base, "pipeline.stages=1", f"pipeline.microbatches={m}"], seq_dir)
                seq_rates.append(steady(seq_dir, a.warmup)[0])
            seq_rate = statistics.median(seq_rates)
            for sched in ("gpipe", "1f1b"):
                if sched == "1f1b" and m < s:
                    continue
                extra = [f"pipeline.partition={a.partition}"] if s == 2 and a.partition else []
                tries = []
                for k in range(a.repeats):
                    d = Path(tmp) / f"{sched}-M{m}-{k}"
                    summ = run(
                        [*base, f"pipeline.stages={s}", f"pipeline.schedule={sched}",
                         f"pipeline.microbatches={m}", *extra],
                        d,
                    )  # fmt: skip
                    tries.append((*steady(d, a.warmup), summ))
                tries.sort(key=lambda t: t[0])
                rate, fb, timed, summ = tries[len(tries) // 2]  # the median run
                rows.append(
                    {
                        "schedule": sched,
                        "M": m,
                        "microbatch": a.batch // m,
                        "samples_per_s": rate,
                        "seq_samples_per_s": seq_rate,
                        "efficiency": rate / (s * seq_rate),
                        "bubble": [st["bubble_fraction"] for st in summ["per_stage"]],
                        "textbook": (s - 1) / (m + s - 1),
                        "fb_ms": fb,
                        "timed_steps": timed,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    cmd = " ".join(["benchmarks/bp_bubble.py", *sys.argv[1:]])
    md = [
        f"# BP pipeline bubble, S={s} ({dt.date.today().isoformat()})",
        "",
        f"Command: `.venv/bin/python {cmd}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"torch {_torch()}, gloo, CPU, 1 thread per process  ",
        f"Code: {_git()}  ",
        f"Workload: `{' '.join(base)}` (+ `pipeline.partition={a.partition}`)  ",
        f"Steady state: steps {a.warmup + 1}..{a.steps} (samples/s); bubble from step 2; "
        f"median of {a.repeats} run(s) per case.  ",
        f"Load average (1 min) before / after: {load0[0]:.2f} / {os.getloadavg()[0]:.2f}",
        "",
        "| schedule | M | microbatch | samples/s | 1-process BP samples/s | efficiency | "
        + " | ".join(f"bubble s{i}" for i in range(s))
        + " | mean bubble | textbook (S-1)/(M+S-1) | "
        + " / ".join(f"F+B s{i}" for i in range(s))
        + " ms/step |",
        "|" + "---|" * (9 + s),
    ]
    for r in rows:
        md.append(
            f"| {r['schedule']} | {r['M']} | {r['microbatch']} | {r['samples_per_s']:.0f} | "
            f"{r['seq_samples_per_s']:.0f} | {r['efficiency']:.2f} | "
            + " | ".join(f"{b:.3f}" for b in r["bubble"])
            + f" | {statistics.mean(r['bubble']):.3f} | {r['textbook']:.3f} | "
            + " / ".join(f"{x:.0f}" for x in r["fb_ms"])
            + " |"
        )
    text = "\n".join(md) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)


def _git() -> str:
    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
        return r.stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"commit {git('rev-parse', '--short', 'HEAD')}" + (" + local changes" if dirty else "")


def _torch() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
