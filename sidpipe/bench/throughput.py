"""`sidpipe bench`: SID vs every BP pipeline schedule (and the sequential references).

For one model, every S and M of the sweep runs, in this one invocation:
  sid       the SID pipeline, messages of B/M samples (kernels see BP's microbatch), and of B
            samples (M=1): one update per B samples, as BP (the equal-update headline)
  <schedule> each BP schedule of torch.distributed.pipelining (gpipe, 1f1b, interleaved_1f1b,
            looped_bfs, interleaved_zb, zbv, dualpipev): batch B in M microbatches; the
            multi-stage ones hold pipeline.stages_per_rank (default 2) stages per rank
  seq_sid   the single-process sequential SID reference on the same messages
  seq_bp    single-process BP with gradient accumulation over the same M microbatches
A (scheme, S, M) whose constraints are not met is listed with the reason, not run. Every run
records a Chrome trace; all numbers come from it: steady-state samples/s (warm-up left out;
the median of several windows, with min and max), per-stage busy / recv-wait / send-wait
fractions (the measured bubble), efficiency against S times the sequential throughput of the
same method, SID against each schedule at the same M, and the headline per S: SID at equal
update size (M=1) and at its fastest message size, each against the fastest BP (schedule, M).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import platform
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sidpipe import drivers
from sidpipe.bench.report import markdown, write_outputs
from sidpipe.bench.simulate import simulated_rows
from sidpipe.config import (
    CONF_DIR,
    Config,
    Method,
    Schedule,
    Variant,
    check_command_line,
    to_config,
    to_dict,
)
from sidpipe.errors import ConfigError, SidpipeError, fail
from sidpipe.runtime.io import atomic_write_json
from sidpipe.runtime.lock import exclusive

log = logging.getLogger("sidpipe.bench")

BARE_KEYS = ("mode", "target_accuracy", "eval_every", "max_epochs", "schemes")
BP_SCHEMES = tuple(s.value for s in Schedule)
PIPELINES = ("sid", *BP_SCHEMES)
# Span names of the runners' traces, by category.
BUSY = {"forward", "backward+step", "compute", "forward+backward", "step", "train-seq"}
BUSY |= {"backward", "loss", "optimizer"}  # the BP runner's clock states (drivers/bp.py)
RECV_WAIT = {"recv-wait"}  # idle: nothing has arrived (BP: every receive wait counts here)
RECV = {"recv"}  # SID: header in, payload moving (a copy the core does; see transport.py)
SEND = {"send", "send-wait"}


@dataclass
class Case:
    scheme: str
    stages: int
    microbatches: int
    cfg: Config | None  # None: not runnable, see `skipped`
    skipped: str = ""
    lr: float | None = None
    seed: int | None = None


def revalidate(cfg: Config) -> Config:
    """Rebuild a changed config so every check runs again (the bench edits copies)."""
    return to_config(OmegaConf.structured(cfg))


def scheme_config(base: Config, scheme: str, stages: int, m: int) -> Config:
    """The run of one scheme; ConfigError where the scheme's constraints are not met."""
    b = base.bench
    cfg = copy.deepcopy(base)
    sid = scheme in ("sid", "seq_sid")
    cfg.method = Method.sid if sid else Method.bp
    cfg.sid.variant = Variant.blockwise
    cfg.pipeline.stages = stages if scheme in PIPELINES else 1
    cfg.pipeline.schedule = Schedule(scheme) if scheme in BP_SCHEMES else Schedule.gpipe
    cfg.pipeline.stages_per_rank = None  # each schedule's default
    if scheme in BP_SCHEMES and Schedule(scheme).multi_stage and stages > 1:
        # a finer cut (S * stages_per_rank stages): the SID cuts do not apply; auto re-plans
        cfg.pipeline.partition = "auto" if cfg.pipeline.partition == "auto" else None
    cfg.pipeline.microbatches = 1 if sid else m
    cfg.pipeline.trace = True
    cfg.train.batch_size = b.batch_size // m if sid else b.batch_size
    cfg.train.log_every = 10**9 if b.mode == "throughput" else cfg.train.log_every
    if b.mode == "throughput":
        cfg.train.max_steps = b.steps * (m if sid else 1)
        cfg.train.epochs = 10**6  # max_steps decides
        cfg.train.eval_every_epoch = cfg.train.final_eval = False
    else:  # time to accuracy: evaluate on the fixed validation split every N BP batches
        cfg.train.max_steps = None
        cfg.train.epochs = b.max_epochs
        cfg.train.eval_every_steps = b.eval_every * (m if sid else 1)
        cfg.train.eval_every_epoch = False
        cfg.data.val_fraction = cfg.data.val_fraction or 0.1
    return revalidate(cfg)


def cases(base: Config) -> list[Case]:
    """The sweep. SID also runs at M=1 (messages of B samples; in tta mode only there, the
    equal update size); tta mode also sweeps bench.lrs x bench.seeds."""
    out = []
    b = base.bench
    lrs = b.lrs or [None]
    seeds = b.seeds or [None]
    for s in b.stages:
        for scheme in b.schemes:
            grid = b.microbatches
            if scheme in ("sid", "seq_sid"):  # tta: SID at equal update size only
                grid = [1] if b.mode == "tta" else sorted({1, *b.microbatches})
            for m in grid:
                for lr in lrs:
                    for seed in seeds:
                        c = copy.deepcopy(base)
                        if lr is not None:
                            c.optim.lr = lr
                        if seed is not None:
                            c.seed = seed
                        try:
                            cfg: Config | None = scheme_config(c, scheme, s, m)
                            skipped = ""
                        except ConfigError as e:
                            cfg, skipped = None, str(e)
                        out.append(Case(scheme, s, m, cfg, skipped, lr, seed))
    return out


# ---- analysis of one trace ------------------------------------------------------------


def _clip(ev: dict[str, Any], a: float, b: float) -> float:
    start, end = ev["ts"], ev["ts"] + ev["dur"]
    return max(0.0, min(end, b) - max(start, a))


def analyze(trace: dict[str, Any], warmup: int, windows: int) -> dict[str, Any]:
    """Steady-state numbers from a run's trace (times in microseconds)."""
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    stages = sorted({e["tid"] for e in spans})
    sink = [e for e in spans if e["tid"] == stages[-1] and e["name"] == "train"]
    sink.sort(key=lambda e: e["ts"])
    ends = [e["ts"] + e["dur"] for e in sink]
    n = [e.get("args", {}).get("n", 0) for e in sink]
    if len(sink) < warmup + windows:
        raise ValueError(
            f"{len(sink)} timed steps is too few for warmup {warmup} + {windows} windows"
        )
    idx = list(range(warmup, len(sink)))
    chunk = len(idx) // windows
    rates = []
    for w in range(windows):
        part = idx[w * chunk : (w + 1) * chunk]
        t0 = ends[part[0] - 1] if part[0] > 0 else sink[part[0]]["ts"]
        rates.append(sum(n[i] for i in part) / ((ends[part[-1]] - t0) / 1e6))
    a, b = (ends[warmup - 1] if warmup > 0 else sink[0]["ts"]), ends[-1]
    per_stage = []
    for s in stages:
        mine = [e for e in spans if e["tid"] == s]
        sums = {
            cat: sum(_clip(e, a, b) for e in mine if e["name"] in names) / (b - a)
            for cat, names in (
                ("busy", BUSY),
                ("recv_wait", RECV_WAIT),
                ("recv", RECV),
                ("send_wait", SEND),
            )  # fmt: skip
        }
        if len(stages) == 1:  # sequential: the whole step is compute
            sums["busy"] = sum(_clip(e, a, b) for e in mine if e["name"] == "train") / (b - a)
        per_stage.append({"stage": s, **sums})
    return {
        "samples_per_s": statistics.median(rates),
        "samples_per_s_min": min(rates),
        "samples_per_s_max": max(rates),
        "window_rates": rates,
        "timed_steps": len(idx),
        "per_stage": per_stage,
        "bubble": statistics.mean(1 - st["busy"] for st in per_stage),
    }


# ---- the sweep ------------------------------------------------------------------------


def machine_label() -> str:
    return f"{platform.machine()}-{os.cpu_count()}cpu"


def out_dir(cfg: Config, run_dir: Path) -> Path:
    """bench.out_dir, else the bench's own run directory (hydra's, or run_dir=): never the
    installed code. Results worth keeping are copied to benchmarks/results/ by hand."""
    return Path(cfg.bench.out_dir) if cfg.bench.out_dir else run_dir


def run_case(case: Case, runs_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"scheme": case.scheme, "stages": case.stages,
                           "microbatches": case.microbatches}  # fmt: skip
    if case.lr is not None or case.seed is not None:
        row.update(lr=case.lr, seed=case.seed)
    if case.cfg is None:
        log.info("bench: %s S=%d M=%d not run: %s", case.scheme, case.stages,
                 case.microbatches, case.skipped)  # fmt: skip
        return {**row, "skipped": case.skipped}
    name = f"{case.scheme}-S{case.stages}-M{case.microbatches}"
    if case.lr is not None:
        name += f"-lr{case.lr:g}"
    if case.seed is not None:
        name += f"-seed{case.seed}"
    run_dir = runs_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)  # the bench's own: a rerun measures anew
    log.info("bench: running %s", name)
    summary = drivers.run(case.cfg, run_dir)
    trace = json.loads((run_dir / "trace.json").read_text())
    m = case.microbatches if case.scheme in ("sid", "seq_sid") else 1
    b = case.cfg.bench
    row.update(run_dir=str(run_dir), batch_size=case.cfg.train.batch_size,
               stages_per_rank=case.cfg.pipeline.stages_per_rank,
               partition=case.cfg.pipeline.partition)  # fmt: skip
    if b.mode == "throughput":
        row.update(analyze(trace, b.warmup * m, b.windows))
    samples = summary["steps"] * case.cfg.train.batch_size
    row["bytes_forward_per_sample"] = (
        sum(s["bytes_sent_forward"] for s in summary["per_stage"]) / samples
    )
    row["bytes_backward_per_sample"] = (
        sum(s["bytes_sent_backward"] for s in summary["per_stage"]) / samples
    )
    row["peak_memory_bytes"] = [s["peak_memory_bytes"] for s in summary["per_stage"]]
    row["peak_tensor_memory_bytes"] = [s["peak_tensor_memory_bytes"] for s in summary["per_stage"]]
    row["evaluations"] = summary.get("evaluations", [])
    return row


def _find(rows: list[dict[str, Any]], scheme: str, s: int, m: int) -> dict[str, Any] | None:
    return next((r for r in rows if (r["scheme"], r["stages"], r["microbatches"]) == (scheme, s, m)
                 and "samples_per_s" in r), None)  # fmt: skip


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Efficiency vs S x sequential of the same method; SID vs each BP schedule at the same M."""
    for r in rows:
        if "samples_per_s" not in r:
            continue
        s, m = r["stages"], r["microbatches"]
        seq = _find(rows, "seq_sid" if r["scheme"] == "sid" else "seq_bp", s, m)
        if r["scheme"] in PIPELINES and seq is not None:
            r["efficiency"] = r["samples_per_s"] / (s * seq["samples_per_s"])
        if r["scheme"] in ("gpipe", "1f1b"):
            r["textbook_bubble"] = (s - 1) / (m + s - 1)
        if r["scheme"] == "sid":
            for bp in BP_SCHEMES:
                other = _find(rows, bp, s, m)
                if other is not None:
                    r[f"ratio_vs_{bp}"] = r["samples_per_s"] / other["samples_per_s"]


def headline(rows: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """Per S: the fastest BP (schedule, M) of the grid; SID at equal update size (one
    message = B samples, one update per B samples like BP) and SID at its fastest message
    size, each as a ratio to that BP."""
    out = []
    for s in sorted({r["stages"] for r in rows}):
        done = [r for r in rows if r["stages"] == s and "samples_per_s" in r]
        bp = [r for r in done if r["scheme"] in BP_SCHEMES]
        sid = [r for r in done if r["scheme"] == "sid"]
        if not bp or not sid:
            continue
        best = max(bp, key=lambda r: r["samples_per_s"])
        equal = next((r for r in sid if r["microbatches"] == 1), None)
        fastest = max(sid, key=lambda r: r["samples_per_s"])
        out.append({
            "stages": s,
            "best_bp": {"schedule": best["scheme"], "microbatches": best["microbatches"],
                        "samples_per_s": best["samples_per_s"]},
            "bp_grid": {f"{r['scheme']} M={r['microbatches']}": r["samples_per_s"] for r in bp},
            "sid_equal_update": None if equal is None else equal["samples_per_s"],
            "ratio_equal_update": None if equal is None
            else equal["samples_per_s"] / best["samples_per_s"],
            "sid_fastest": {"message": batch // fastest["microbatches"], "microbatches":
                            fastest["microbatches"], "samples_per_s": fastest["samples_per_s"]},
            "ratio_fastest": fastest["samples_per_s"] / best["samples_per_s"],
        })  # fmt: skip
    return out


def time_to_accuracy(rows: list[dict[str, Any]], target: float) -> None:
    for r in rows:
        if "evaluations" not in r:
            continue
        hit = next((e for e in r["evaluations"] if e["val_per_depth"][-1] >= target), None)
        r["tta_target"] = target
        r["tta_train_s"] = hit["train_s"] if hit else None
        r["tta_step"] = hit["step"] if hit else None
        r["tta_samples"] = hit["step"] * r["batch_size"] if hit else None
        best = max(r["evaluations"], key=lambda e: e["val_per_depth"][-1], default=None)
        r["best_val_accuracy"] = best["val_per_depth"][-1] if best else None
        # the test accuracy at the evaluation validation chose (never selected on test)
        r["test_at_best_val"] = best["test_per_depth"][-1] if best else None


def lr_selection(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tta mode: per (scheme, S, M), each learning rate's mean over seeds, and the rate
    chosen by mean best validation accuracy (selection on validation, never on test)."""
    out = []
    keys = sorted({(r["scheme"], r["stages"], r["microbatches"]) for r in rows
                   if "best_val_accuracy" in r})  # fmt: skip
    for scheme, s, m in keys:
        mine = [r for r in rows if (r["scheme"], r["stages"], r["microbatches"]) == (scheme, s, m)
                and "best_val_accuracy" in r]  # fmt: skip
        per_lr = []
        for lr in sorted({r.get("lr") for r in mine}, key=lambda x: (x is None, x or 0)):
            runs = [r for r in mine if r.get("lr") == lr]
            reached = [r for r in runs if r["tta_train_s"] is not None]

            def mean(key: str, rs: list[dict[str, Any]] = reached) -> float | None:
                return statistics.mean(r[key] for r in rs) if rs else None

            per_lr.append({
                "lr": lr, "seeds": len(runs), "reached": len(reached),
                "best_val_accuracy": statistics.mean(r["best_val_accuracy"] for r in runs),
                "test_at_best_val": statistics.mean(r["test_at_best_val"] for r in runs),
                "tta_train_s": mean("tta_train_s") if len(reached) == len(runs) else None,
                "tta_samples": mean("tta_samples") if len(reached) == len(runs) else None,
            })  # fmt: skip
        chosen = max(per_lr, key=lambda x: x["best_val_accuracy"])
        out.append({"scheme": scheme, "stages": s, "microbatches": m, "chosen": chosen,
                    "sweep": per_lr})  # fmt: skip
    return out


def versions() -> dict[str, str]:
    import torch

    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": str(os.cpu_count()),
    }


def run_bench(cfg: Config, command: list[str], run_dir: Path) -> dict[str, Any]:
    """Every case of the grid, in this order, into bench.out_dir (locked meanwhile: two
    benches writing one directory would mix their results)."""
    if cfg.pipeline.threads == "auto":
        # Every scheme runs with the same threads per stage process, the bench's recorded
        # setting: auto would hand the single-process references S times a stage's cores.
        cfg.pipeline.threads = 1
    out = out_dir(cfg, run_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"bench.out_dir={out} is a file; give a directory")
    with exclusive(out, "bench"):
        return _run_bench(cfg, command, out)


def _run_bench(cfg: Config, command: list[str], out: Path) -> dict[str, Any]:
    runs_dir = out / "runs"
    if cfg.bench.mode == "simulate":
        rows = simulated_rows(cfg)
    else:
        rows = [run_case(c, runs_dir) for c in cases(cfg)]
    extra: dict[str, Any] = {}
    if cfg.bench.mode in ("throughput", "simulate"):
        add_ratios(rows)
        extra["headline"] = headline(rows, cfg.bench.batch_size)
    elif cfg.bench.mode == "tta":
        time_to_accuracy(rows, cfg.bench.target_accuracy)
        extra["lr_selection"] = lr_selection(rows)
    result = {
        "command": " ".join(command),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_label(),
        "versions": versions(),
        "config": to_dict(cfg),
        "rows": rows,
        **extra,
    }
    atomic_write_json(out / "bench.json", result)
    write_outputs(result, out)
    return result


def main() -> None:
    """Hydra entry: the same config tree as `sidpipe train`, plus the `bench.*` keys."""
    # `sidpipe bench mode=tta target_accuracy=0.98`: the bench's own keys also work bare.
    for i, arg in enumerate(sys.argv[1:], start=1):
        if arg.split("=", 1)[0] in BARE_KEYS:
            sys.argv[i] = "bench." + arg
    command = ["sidpipe", "bench", *sys.argv[1:]]
    try:  # one line for a mistake, before hydra.main's seven (sidpipe/config.py)
        check_command_line(sys.argv[1:])
    except SidpipeError as e:
        fail(str(e))

    @hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
    def _main(dcfg: DictConfig) -> None:
        try:
            cfg = to_config(dcfg)
            run_dir = Path(cfg.run_dir or HydraConfig.get().runtime.output_dir)
            result = run_bench(cfg, command, run_dir)
        except (SidpipeError, ValueError) as e:
            fail(str(e))
        print(markdown(result), flush=True)
        print(f"results: {out_dir(cfg, run_dir)}", flush=True)

    _main()
