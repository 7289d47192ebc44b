"""`sidpipe bench`: SID vs GPipe vs 1F1B (and the sequential references), side by side.

For one model and partition, every (S, M) of the sweep runs, in this one invocation:
  sid     the SID pipeline, messages of B/M samples (kernels see BP's microbatch)
  gpipe   GPipe backprop pipeline, batch B in M microbatches
  1f1b    1F1B backprop pipeline, same work
  seq_sid the single-process sequential SID reference on the same messages
  seq_bp  single-process BP with gradient accumulation over the same M microbatches
Every run records a Chrome trace; all numbers below are computed from it: steady-state
samples/s (warm-up left out; the median of several windows, with min and max), per-stage
busy / recv-wait / send-wait fractions (the measured bubble), efficiency against S times the
sequential throughput of the same method, and the SID/GPipe and SID/1F1B ratios.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sidpipe import drivers
from sidpipe.bench.balance import auto_partition, plan_partition
from sidpipe.bench.report import markdown, write_outputs
from sidpipe.bench.simulate import measure_stage_times, simulate
from sidpipe.config import CONF_DIR, Config, Method, Schedule, Variant, to_config, to_dict
from sidpipe.data import load_data
from sidpipe.errors import SidpipeError, fail
from sidpipe.models import build_net
from sidpipe.runtime.device import select_device, set_threads
from sidpipe.runtime.io import atomic_write_json

log = logging.getLogger("sidpipe.bench")

BARE_KEYS = ("mode", "target_accuracy", "eval_every", "max_epochs", "schemes")
# Span names of the runners' traces, by category.
BUSY = {"forward", "backward+step", "compute", "forward+backward", "step", "train-seq"}
BUSY |= {"backward", "loss", "optimizer"}  # the BP runner's clock states (pipeline/bp.py)
RECV_WAIT = {"recv-wait"}  # idle: nothing has arrived (BP: every receive wait counts here)
RECV = {"recv"}  # SID: header in, payload moving (a copy the core does; see transport.py)
SEND = {"send", "send-wait"}


@dataclass
class Case:
    scheme: str
    stages: int
    microbatches: int
    cfg: Config


def scheme_config(base: Config, scheme: str, stages: int, m: int) -> Config | None:
    """The run of one scheme; None where it does not apply (1F1B needs M >= S)."""
    b = base.bench
    if scheme == "1f1b" and m < stages:
        return None
    cfg = copy.deepcopy(base)
    sid = scheme in ("sid", "seq_sid")
    cfg.method = Method.sid if sid else Method.bp
    cfg.sid.variant = Variant.blockwise
    cfg.pipeline.stages = stages if scheme in ("sid", "gpipe", "1f1b") else 1
    cfg.pipeline.schedule = Schedule.onef1b if scheme == "1f1b" else Schedule.gpipe
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
    return cfg


def cases(base: Config) -> list[Case]:
    out = []
    b = base.bench
    for s in b.stages:
        for m in b.microbatches:
            for scheme in b.schemes:
                cfg = scheme_config(base, scheme, s, m)
                if cfg is not None:
                    out.append(Case(scheme, s, m, cfg))
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
    name = f"{case.scheme}-S{case.stages}-M{case.microbatches}"
    run_dir = runs_dir / name
    log.info("bench: running %s", name)
    summary = drivers.run(case.cfg, run_dir, planner=plan_partition)
    trace = json.loads((run_dir / "trace.json").read_text())
    m = case.microbatches if case.scheme in ("sid", "seq_sid") else 1
    b = case.cfg.bench
    row: dict[str, Any] = {
        "scheme": case.scheme,
        "stages": case.stages,
        "microbatches": m and case.microbatches,
        "run_dir": str(run_dir),
        "batch_size": case.cfg.train.batch_size,
    }
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


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Efficiency vs S x sequential of the same method; SID vs the BP schedules."""

    def find(scheme: str, s: int, m: int) -> dict[str, Any] | None:
        return next(
            (r for r in rows if (r["scheme"], r["stages"], r["microbatches"]) == (scheme, s, m)),
            None,
        )

    for r in rows:
        if "samples_per_s" not in r:
            continue
        s, m = r["stages"], r["microbatches"]
        seq = find("seq_sid" if r["scheme"] == "sid" else "seq_bp", s, m)
        if r["scheme"] in ("sid", "gpipe", "1f1b") and seq is not None:
            r["efficiency"] = r["samples_per_s"] / (s * seq["samples_per_s"])
        if r["scheme"] in ("gpipe", "1f1b"):
            r["textbook_bubble"] = (s - 1) / (m + s - 1)
        if r["scheme"] == "sid":
            for bp in ("gpipe", "1f1b"):
                other = find(bp, s, m)
                if other is not None:
                    r[f"ratio_vs_{bp}"] = r["samples_per_s"] / other["samples_per_s"]


def time_to_accuracy(rows: list[dict[str, Any]], target: float) -> None:
    for r in rows:
        hit = next((e for e in r["evaluations"] if e["val_per_depth"][-1] >= target), None)
        r["tta_target"] = target
        r["tta_train_s"] = hit["train_s"] if hit else None
        r["tta_step"] = hit["step"] if hit else None
        r["tta_test_accuracy"] = hit["test_per_depth"][-1] if hit else None
        r["best_val_accuracy"] = max(
            (e["val_per_depth"][-1] for e in r["evaluations"]), default=None
        )


def versions() -> dict[str, str]:
    import torch

    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": str(os.cpu_count()),
    }


def simulated_rows(cfg: Config) -> list[dict[str, Any]]:
    """SIMULATED S-device pipelines from per-stage times measured on this one device."""
    set_threads(cfg, 0)  # this process only measures: no stages are spawned after it
    device = select_device(cfg)
    data = load_data(cfg.data, cfg.seed)
    rows = []
    for s in cfg.bench.stages:
        for m in cfg.bench.microbatches:
            c = copy.deepcopy(cfg)
            c.pipeline.stages = s
            if c.pipeline.partition == "auto":  # balanced on this device, as a real run would
                c.train.batch_size = c.bench.batch_size // m  # profiled at the message size
                c.pipeline.partition = auto_partition(c, data, build_net(c, data), device)["cuts"]
            times = measure_stage_times(
                c, data, build_net(c, data), device, c.bench.batch_size // m
            )
            sim = simulate(times, c.bench.batch_size, m)
            for scheme in ("sid", "gpipe", "1f1b", "seq_sid", "seq_bp"):
                rows.append({"scheme": scheme, "stages": s, "microbatches": m, "simulated": True,
                             "partition": c.pipeline.partition,
                             "device": str(device), "samples_per_s": sim[f"{scheme}_samples_per_s"],
                             "stage_times_ms": [{k: v * 1e3 for k, v in vars(t).items()}
                                                for t in times]})  # fmt: skip
    return rows


def run_bench(cfg: Config, command: list[str], run_dir: Path) -> dict[str, Any]:
    out = out_dir(cfg, run_dir)
    runs_dir = out / "runs"
    if cfg.bench.mode == "simulate":
        rows = simulated_rows(cfg)
    else:
        rows = [run_case(c, runs_dir) for c in cases(cfg)]
    if cfg.bench.mode in ("throughput", "simulate"):
        add_ratios(rows)
    elif cfg.bench.mode == "tta":
        time_to_accuracy(rows, cfg.bench.target_accuracy)
    result = {
        "command": " ".join(command),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_label(),
        "versions": versions(),
        "config": to_dict(cfg),
        "rows": rows,
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
