"""The pipeline simulator (SIMULATED) against a measured `sidpipe bench` run of the same config.

Given a measured bench.json (throughput mode; rows of scheme / stages / microbatches /
samples_per_s, the bench's config under "config"), this runs the simulator
(`sidpipe.bench.simulate.simulated_rows`, what `bench.mode=simulate` runs) with that config
on this machine and writes a markdown table of measured vs simulated samples/s, the error of
each row, and their mean and max. Three more columns explain the errors:

- compute x: each rank's compute per batch (SID: per message) in the measured pipeline (the
  busy spans of its trace, where the run directory is still on disk) over the same compute
  measured alone, as the simulator measures it. Above 1: the ranks slow each other down.
- replay of measured compute: the simulation again with each rank's costs scaled by that
  factor. It checks the schedule and link model apart from the cost measurement.
- with a busy neighbour (--corun): the stage costs measured again while a second process on
  the other core runs the same model's stage work, blended per rank by how much of its busy
  time another rank is busy too in the simulated timeline (iterated to a fixed point). It is
  a prediction from measurements, like SIMULATED: nothing is fitted to the measured run.

    .venv/bin/python benchmarks/sim_vs_measured.py MEASURED/bench.json --out DIR \
        [--probe-link] [--corun] [--wait-quiet SECONDS]

--probe-link measures the link between two processes here first (gloo ping-pong on separate
cores, as the bench pins its stages) and simulates with it instead of the defaults.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from sidpipe.bench import simulate
from sidpipe.bench.simulate import StageTimes
from sidpipe.config import Config, Schedule, to_config
from sidpipe.data import load_data
from sidpipe.models import build_net

BUSY = {"forward", "backward", "loss", "optimizer", "backward+step", "compute"}
COSTS = ("sid_forward", "sid_update", "bp_forward", "bp_backward", "bp_input", "bp_weight",
         "bp_update")  # fmt: skip


def load_config(measured: dict[str, Any]) -> Config:
    return to_config(OmegaConf.merge(OmegaConf.structured(Config), measured["config"]))


def pin(core_index: int) -> None:
    """This process on one core (like pipeline.cpu_affinity), one torch thread."""
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[core_index % len(cores)]})
    torch.set_num_threads(1)


# ---- the link between two processes -------------------------------------------------------


def _ping(rank: int, port: int, sizes: list[int], reps: int, out: Any) -> None:
    pin(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = {}
    for n in sizes:
        buf = torch.zeros(max(1, n // 4))
        times = []
        for k in range(reps + 5):
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if k >= 5:
                times.append((time.perf_counter() - t0) / 2)  # one way
        result[n] = statistics.median(times)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def probe_link(nbytes: int, reps: int = 50) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of one message between two processes on this machine."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29000 + os.getpid() % 1000
    procs = [ctx.Process(target=_ping, args=(r, port, [4, nbytes], reps, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    result = out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    latency = result[4]
    return nbytes / max(result[nbytes] - latency, 1e-9), latency


# ---- a quiet machine ------------------------------------------------------------------------


def cpu_busy_s() -> float:
    """Seconds of CPU time all processes have used since boot (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def own_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_quiet(limit_s: float, window_s: float = 5.0, cores: float = 0.1) -> float:
    """Wait (up to limit_s) for a window in which other processes use < `cores` cores: the
    stage costs are measured one at a time on one core and must not share it. Returns the
    cores others used in the last window."""
    deadline = time.time() + limit_s
    while True:
        b0, o0 = cpu_busy_s(), own_s()
        time.sleep(window_s)
        others = ((cpu_busy_s() - b0) - (own_s() - o0)) / window_s
        if others < cores or time.time() > deadline:
            return others


# ---- a busy neighbour -----------------------------------------------------------------------


def _neighbour(cfg: Config, jobs: Any, acks: Any) -> None:
    """Run the stage work of whatever layout was last asked for, over and over, on core 1."""
    pin(1)
    data = load_data(cfg.data, cfg.seed)
    net = build_net(cfg, data)
    job = jobs.get()
    while job is not None:
        n, mb, cuts, parts = job
        c = copy.deepcopy(cfg)
        c.pipeline.partition = cuts
        simulate.measure_stage_times(c, data, net, torch.device("cpu"), mb, n, parts, iters=2)
        acks.put(job)  # busy with it now
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            pass


def corun_times(cfg: Config, layouts: list[tuple]) -> dict[tuple, list[StageTimes]]:
    """Stage costs of each (n_stages, microbatch, cuts, parts) measured on core 0 while a
    neighbour process loops the same layout's stage work on core 1."""
    ctx = mp.get_context("spawn")
    jobs, acks = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_neighbour, args=(cfg, jobs, acks), daemon=True)
    proc.start()
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    pin(0)
    data = load_data(cfg.data, cfg.seed)
    net = build_net(cfg, data)
    out = {}
    try:
        for layout in layouts:
            jobs.put(layout)
            while acks.get(timeout=600) != layout:  # until the neighbour runs this one
                pass
            n, mb, cuts, parts = layout
            c = copy.deepcopy(cfg)
            c.pipeline.partition = cuts
            out[layout] = simulate.measure_stage_times(c, data, net, torch.device("cpu"), mb, n,
                                                       parts)  # fmt: skip
    finally:
        jobs.put(None)
        proc.join(timeout=120)
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
    return out


# ---- one simulated row, taken apart ---------------------------------------------------------


def row_times(row: dict[str, Any]) -> list[StageTimes]:
    return [StageTimes(**{k: v / 1e3 for k, v in ms.items()}, sid_bytes=b["sid"], bp_bytes=b["bp"])
            for ms, b in zip(row["stage_times_ms"], row["stage_bytes"])]  # fmt: skip


def owners(row: dict[str, Any]) -> tuple[list[int], list | None]:
    """The rank of each stage, and the BP action lists (None for SID)."""
    s, m = row["stages"], row["microbatches"]
    if row["scheme"] == "sid":
        return list(range(s)), None
    orders = simulate.schedule_actions(Schedule(row["scheme"]), s, m, row["stages_per_rank"])
    rank = {st: r for r, acts in enumerate(orders) for _, st, _ in acts}
    return [rank[st] for st in range(len(rank))], orders


def timeline(row: dict[str, Any], times: list[StageTimes], batch: int) -> tuple[float, list]:
    """(samples/s, per-rank events) of the row's scheme with these stage costs."""
    link = (row["link"]["bandwidth_gbs"] * 1e9, row["link"]["latency_us"] / 1e6)
    s, m = row["stages"], row["microbatches"]
    rate = simulate.samples_per_s(row["scheme"], times, s, batch, m, link)
    if row["scheme"] == "sid":
        return rate, simulate.simulate_sid(times, 8 * m * s, link)[1]
    return rate, simulate.replay(times, owners(row)[1], link)[1]


def busy_alone(row: dict[str, Any]) -> list[float]:
    """Each rank's compute per batch (SID: per message) at the costs measured alone."""
    times = row_times(row)
    if row["scheme"] == "sid":
        return [t.sid_forward + t.sid_update for t in times]
    cost = {"F": "bp_forward", "B": "bp_backward", "I": "bp_input", "W": "bp_weight"}
    return [sum(getattr(times[st], cost[k]) for k, st, _ in acts)
            + sum(times[st].bp_update for st in {st for _, st, _ in acts})
            for acts in owners(row)[1]]  # fmt: skip


def scaled(times: list[StageTimes], owner: list[int], factor: list[float]) -> list[StageTimes]:
    return [StageTimes(**{k: getattr(t, k) * factor[owner[st]] for k in COSTS},
                       sid_bytes=t.sid_bytes, bp_bytes=t.bp_bytes)
            for st, t in enumerate(times)]  # fmt: skip


def overlap(events: list[list[tuple]], r: int) -> float:
    """Share of rank r's busy time during which some other rank is busy too."""
    others = sorted((a, b) for q, ev in enumerate(events) if q != r for a, b, _ in ev)
    union: list[list[float]] = []
    for a, b in others:
        if union and a <= union[-1][1]:
            union[-1][1] = max(union[-1][1], b)
        else:
            union.append([a, b])
    mine = [(a, b) for a, b, _ in events[r] if b > a]
    both = sum(max(0.0, min(b, d) - max(a, c)) for a, b in mine for c, d in union)
    return both / max(sum(b - a for a, b in mine), 1e-12)


def contended(row: dict[str, Any], corun: list[StageTimes], batch: int) -> float:
    """Samples/s when a stage costs its co-run price while another rank is busy: each rank's
    costs blended by its simulated overlap, three rounds towards a fixed point."""
    alone, (owner, _) = row_times(row), owners(row)
    times = alone
    for _ in range(3):
        _, events = timeline(row, times, batch)
        share = [overlap(events, owner[st]) for st in range(len(alone))]
        times = [StageTimes(**{k: getattr(a, k) + (getattr(c, k) - getattr(a, k)) * share[st]
                               for k in COSTS}, sid_bytes=a.sid_bytes, bp_bytes=a.bp_bytes)
                 for st, (a, c) in enumerate(zip(alone, corun))]  # fmt: skip
    return timeline(row, times, batch)[0]


# ---- measured compute per rank, from the traces -------------------------------------------


def measured_busy(row: dict[str, Any], warmup: int) -> list[float] | None:
    """Each rank's busy seconds per batch (SID: per message) in the timed window."""
    trace_path = Path(row.get("run_dir", "")) / "trace.json"
    if not trace_path.is_file():
        return None
    spans = [e for e in json.loads(trace_path.read_text())["traceEvents"] if e.get("ph") == "X"]
    tids = sorted({e["tid"] for e in spans})
    sink = sorted((e for e in spans if e["tid"] == tids[-1] and e["name"] == "train"),
                  key=lambda e: e["ts"])  # fmt: skip
    if len(sink) <= warmup + 1:
        return None
    a, b = sink[warmup - 1]["ts"] + sink[warmup - 1]["dur"], sink[-1]["ts"] + sink[-1]["dur"]

    def clip(e: dict) -> float:
        return max(0.0, min(e["ts"] + e["dur"], b) - max(e["ts"], a))

    return [sum(clip(e) for e in spans if e["tid"] == t and e["name"] in BUSY)
            / (len(sink) - warmup) / 1e6 for t in tids]  # fmt: skip


# ---- the comparison -------------------------------------------------------------------------


def pct(a: float, b: float) -> float:
    return (a - b) / b * 100


def compare(measured: dict[str, Any], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    cfg = load_config(measured)
    rows = [r for r in measured["rows"] if "samples_per_s" in r]
    batch = cfg.bench.batch_size
    cfg.bench.mode = "simulate"
    cfg.bench.stages = sorted({r["stages"] for r in rows})
    cfg.bench.microbatches = sorted({r["microbatches"] for r in rows})
    cfg.bench.schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    link = None  # the simulator's defaults
    notes = [f"link: bandwidth {cfg.pipeline.auto_bandwidth_gbs} GB/s "
             f"(pipeline.auto_bandwidth_gbs), latency {simulate.LINK_LATENCY_S * 1e6:.0f} us "
             "(the simulator's defaults)"]  # fmt: skip
    before = wait_quiet(args.wait_quiet) if args.wait_quiet else None
    if args.probe_link:  # the largest activation the BP pipelines sent
        per_sample = max(r.get("bytes_forward_per_sample", 0) for r in rows if r["stages"] > 1)
        nbytes = int(per_sample * batch / min(cfg.bench.microbatches)) or 2**18
        link = bandwidth, latency = probe_link(nbytes)
        notes = [f"link probed here (gloo ping-pong, two pinned processes): latency "
                 f"{latency * 1e6:.0f} us, bandwidth {bandwidth / 1e9:.2f} GB/s "
                 f"({nbytes} B)"]  # fmt: skip
    t0, b0, o0 = time.perf_counter(), cpu_busy_s(), own_s()
    sim = {(r["scheme"], r["stages"], r["microbatches"]): r
           for r in simulate.simulated_rows(cfg, link)}  # fmt: skip
    corun: dict[tuple, list[StageTimes]] = {}
    if args.corun:
        layouts = {(len(r["stage_times_ms"]), batch // r["microbatches"], r["partition"],
                    ("sid",) if "sid" in r["scheme"] else ("bp",)): None
                   for r in sim.values() if r["scheme"] not in ("seq_sid", "seq_bp")}  # fmt: skip
        corun = corun_times(cfg, list(layouts))
    took = time.perf_counter() - t0
    others = ((cpu_busy_s() - b0) - (own_s() - o0)) / took
    quiet = "" if before is None else f"{before:.2f} cores busy with other work just before, "
    notes.append(f"measuring took {took:.0f} s; {quiet}{others:.2f} cores busy with other work "
                 "during it")  # fmt: skip
    lines = ["**SIMULATED** vs measured samples/s (see the column notes in "
             "`benchmarks/sim_vs_measured.py`); " + "; ".join(notes) + ".", "",
             "| scheme | S | M | measured | SIMULATED | error % | compute x (per rank) | "
             "replay of measured compute | error % | with a busy neighbour | error % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    errs: dict[str, list[float]] = {"SIMULATED": [], "replay": [], "neighbour": []}
    table = []
    for r in rows:
        key = (r["scheme"], r["stages"], r["microbatches"])
        got = r["samples_per_s"]
        if key not in sim:
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {got:.0f} | not simulated |" + " |" * 6
            )
            continue
        row, s = sim[key], sim[key]["samples_per_s"]
        out = {"scheme": key[0], "stages": key[1], "microbatches": key[2], "measured": got,
               "simulated": s, "error_pct": pct(s, got)}  # fmt: skip
        errs["SIMULATED"].append(abs(pct(s, got)))
        cells = [""] * 5
        pipeline = key[0] not in ("seq_sid", "seq_bp")
        busy = measured_busy(r, cfg.bench.warmup * (key[2] if key[0] == "sid" else 1))
        if pipeline and busy:
            factor = [b / a for b, a in zip(busy, busy_alone(row))]
            again = timeline(row, scaled(row_times(row), owners(row)[0], factor), batch)[0]
            errs["replay"].append(abs(pct(again, got)))
            out.update(compute_factor=factor, replay_measured_compute=again)
            cells[:3] = ["/".join(f"{f:.2f}" for f in factor), f"{again:.0f}",
                         f"{pct(again, got):+.1f}"]  # fmt: skip
        layout = (len(row["stage_times_ms"]), batch // key[2], row["partition"],
                  ("sid",) if "sid" in key[0] else ("bp",))  # fmt: skip
        if pipeline and layout in corun:
            mixed = contended(row, corun[layout], batch)
            errs["neighbour"].append(abs(pct(mixed, got)))
            out.update(with_neighbour=mixed, corun_stage_times_ms=[t.ms() for t in corun[layout]])
            cells[3:] = [f"{mixed:.0f}", f"{pct(mixed, got):+.1f}"]
        table.append(out)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {got:.0f} | {s:.0f} | "
                     f"{pct(s, got):+.1f} | " + " | ".join(cells) + " |")  # fmt: skip
    lines.append("")
    for name, e in errs.items():
        if e:
            lines.append(f"- {name}: mean absolute error {statistics.mean(e):.1f} %, max "
                         f"{max(e):.1f} %; within 10 %: {sum(x <= 10 for x in e)} of "
                         f"{len(e)} rows")  # fmt: skip
    return "\n".join(lines) + "\n", {"rows": table, "simulated": list(sim.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("measured", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--probe-link", action="store_true")
    ap.add_argument("--corun", action="store_true", help="also measure with a busy neighbour")
    ap.add_argument("--wait-quiet", type=float, default=600, help="max s to wait for idle CPUs")
    args = ap.parse_args()
    measured = json.loads(args.measured.read_text())
    body, data = compare(measured, args)
    head = [
        f"# Simulator vs measurement ({dt.date.today().isoformat()})",
        "",
        f"Command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`  ",
        f"Measured: `{args.measured}` (`{measured.get('command', '?')}`, {measured.get('date')})  ",
        f"Machine: {platform.machine()}-{os.cpu_count()}cpu ({platform.processor() or '?'}), "
        f"torch {torch.__version__}, {dt.datetime.now().isoformat(timespec='seconds')}",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "README.md").write_text("\n".join(head) + "\n" + body)
    (args.out / "sim_vs_measured.json").write_text(json.dumps(data, indent=1, default=str))
    print("\n".join(head) + "\n" + body)


if __name__ == "__main__":
    main()
