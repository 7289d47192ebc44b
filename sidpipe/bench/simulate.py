"""An event simulation of S-device pipelines from measured per-stage costs (SIMULATED).

One device can still answer "what would S devices do": measure each pipeline stage's work
on that device (`measure_stage_times`), take the per-rank action lists torch's own
schedules would execute (`schedule_actions`), and replay them as dependency-driven events
(`replay`, `simulate_sid`). Every number this module produces is labelled simulated
wherever it is reported.

- BP: each rank runs its list in order, one action at a time. F of stage k, microbatch i
  needs stage k-1's F of i; B or I of stage k needs stage k+1's B or I of i (the last stage:
  its own F, which computes the loss); W needs its own I. After its last action of a batch
  a rank steps the optimizer of its stages. Several batches run back to back; the rate is
  taken between the ends of the first and the last (steady state, no start-up ramp).
- SID: stage s handles message m after it finished message m-1 and after stage s-1 sent m;
  it sends after its forward, then runs its local backward + step (no flush).
- Communication: a transfer between ranks holds the directed link for bytes / bandwidth
  (in send order) and arrives `latency` later; compute overlaps with it. A hand-off
  between two stages on one rank (the middle of a V) is free.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._backward import (
    stage_backward,
    stage_backward_input,
    stage_backward_weight,
)

# Importing fake_pg registers the "fake" backend: a process group that builds, never sends.
from torch.testing._internal.distributed.fake_pg import FakeStore

from sidpipe.config import Config, Method, Schedule
from sidpipe.data import DataBundle, load_data, shuffled_batches
from sidpipe.drivers.balance import best_cuts, profile_blocks
from sidpipe.drivers.bp import SCHEDULES, EngineModule, stage_ids
from sidpipe.errors import ConfigError
from sidpipe.method.learner import SIDLearner, build_optimizer
from sidpipe.models import BlockNet, build_net
from sidpipe.models.partition import Stage, partition_blocks
from sidpipe.runtime.device import select_device, set_threads
from sidpipe.runtime.io import timed_call
from sidpipe.runtime.wire import wire_nbytes

# One message between two processes costs this much beyond bytes / bandwidth: half the
# round trip of a 4-byte gloo send/recv between two processes pinned to two cores of the
# 2-core bench machine: 71 us (benchmarks/results/sim-vs-measured-2026-12-01/README.md).
LINK_LATENCY_S = 70e-6
Action = tuple[str, int, int]  # (kind F | B | I | W, pipeline stage, microbatch)
Link = tuple[float, float]  # (bandwidth in bytes/s, latency in s); None = free transfers


@dataclass
class StageTimes:
    """One pipeline stage's costs on one device, seconds (and bytes it sends)."""

    sid_forward: float  # blocks + heads + losses, one SID message
    sid_update: float  # local backward + optimizer step of that message
    bp_forward: float  # blocks (+ final head and the loss on the last stage), one microbatch
    bp_backward: float  # full backward (B): input and weight gradients together
    bp_input: float  # I: input gradients only (0 on stage 0: torch skips it there)
    bp_weight: float  # W: weight gradients (stage 0: the whole backward, as torch runs it)
    bp_update: float  # optimizer step over this stage's parameters, once per batch
    sid_bytes: int = 0  # one SID message out of this stage (h, belief, labels)
    bp_bytes: int = 0  # one microbatch's activation out (its gradient comes back as large)

    def ms(self) -> dict[str, float]:
        return {k: v * 1e3 for k, v in vars(self).items() if not k.endswith("_bytes")}


# ---- measuring one device -----------------------------------------------------------------


def _median_times(
    fns: list[Callable[[], Any]], device: torch.device, iters: int, warmup: int, budget_s: float
) -> list[float]:
    """Median seconds of each of `fns`, called in turn as one round, after `warmup` rounds
    (allocator, lazy optimizer state). At least 2 rounds, up to `iters` while the rounds so
    far took under `budget_s`: big models get fewer. The median shrugs off a busy neighbour."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    t0 = time.perf_counter()
    while len(samples[0]) < 2 or (len(samples[0]) < iters and time.perf_counter() - t0 < budget_s):
        for k, fn in enumerate(fns):
            samples[k].append(timed_call(fn, device))
    return [statistics.median(s) for s in samples]


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _time_sid(stage_mod: Stage, cfg: Config, h, p, y, **timing) -> tuple[float, float]:
    """SID forward and update (local backward + step) of one message, as the runner runs them."""
    learner = SIDLearner(stage_mod, cfg, total_updates=1000, device=timing["device"])
    out: dict = {}

    def forward() -> None:
        out["fwd"] = learner.forward(h, p, y)

    fns = [forward, lambda: learner.update(out["fwd"][2])]
    f, u = _median_times(fns, warmup=learner.warm_up_messages, **timing)
    return f, u


def _time_bp(module: EngineModule, cfg: Config, h, y, **timing) -> tuple[float, ...]:
    """BP forward, B, I, W and the optimizer step of one stage, exactly as torch's
    PipelineStage runs them: the runner's module and loss (cross entropy / M on the last
    stage, right after its forward), torch's own backward helpers."""
    first, last = module.stage.is_first, module.stage.is_last
    inp = h.detach().requires_grad_(not first)
    with torch.no_grad():
        out = module(inp)
    grads = None if last else (torch.ones_like(out),)  # any upstream gradient costs the same
    state: dict = {}

    def fwd() -> None:
        inp.grad = None  # a received activation is a fresh tensor each microbatch
        o = module(inp)  # torch keeps a last stage's loss bare, other outputs in a tuple
        if last:  # (B, T, V) logits of a language model: every position is a prediction
            loss = F.cross_entropy(o.flatten(0, -2), y.flatten())
            state["out"] = loss / cfg.pipeline.microbatches
        else:
            state["out"] = (o,)

    def full() -> None:
        stage_backward(state["out"], grads, [inp])

    def input_grads() -> None:
        outs = (state["out"],) if last else state["out"]
        _, state["groups"] = stage_backward_input(outs, grads, [inp], module.parameters())

    def weight_grads() -> None:
        stage_backward_weight(module.parameters(), state["groups"])

    f1, b = _median_times([fwd, full], warmup=1, **timing)
    if first:  # torch skips I on stage 0 (its input needs no gradient); W is the whole B
        f2, i, w = f1, 0.0, b
    else:
        f2, i, w = _median_times([fwd, input_grads, weight_grads], warmup=1, **timing)
    params = [q for blk in module.stage.blocks for q in blk.parameters()]
    if last:  # the runner trains the blocks and the final head
        params += list(module.stage.heads[-1].parameters())
    opt, _ = build_optimizer(params, cfg.optim, 1000)
    (u,) = _median_times([opt.step], warmup=1, **timing)  # the grads are there by now
    return (f1 + f2) / 2, b, i, w, u


def measure_stage_times(
    cfg: Config,
    data: DataBundle,
    net: BlockNet,
    device: torch.device,
    microbatch: int,
    n_stages: int | None = None,
    parts: tuple[str, ...] = ("sid", "bp"),
    iters: int = 7,
) -> list[StageTimes]:
    """Per-stage costs on one device for `microbatch` samples per message, the model cut
    into `n_stages` stages (default cfg.stage_count) at cfg.pipeline.partition (cut points
    or None); each stage's input is the previous stage's output. `parts`: which of the SID
    and the BP costs to measure (the others stay 0)."""
    x, y = next(iter(shuffled_batches(data, microbatch, cfg.seed).epoch(0)))
    h_sid = h_bp = x.to(device)
    y = y.to(device)
    p = net.prior(h_sid).float()  # uniform: (B, K), or (B, T, V) for a language model
    timing = dict(device=device, iters=iters, budget_s=3.0)
    out = []
    for r in partition_blocks(net.n_blocks, n_stages or cfg.stage_count, cfg.pipeline.partition):
        stage_mod = Stage(net, r).to(device)
        module = EngineModule(stage_mod, cfg, device, fault=None).to(device)
        sid = _time_sid(stage_mod, cfg, h_sid, p, y, **timing) if "sid" in parts else (0, 0)
        bp = _time_bp(module, cfg, h_bp, y, **timing) if "bp" in parts else (0,) * 5
        with torch.no_grad():  # the next stage's inputs, and what this one sends
            h_sid, p, _ = stage_mod(h_sid, p)
            h_bp = module(h_bp)
        last = stage_mod.is_last
        out.append(StageTimes(*sid, *bp, sid_bytes=0 if last else wire_nbytes(cfg, h_sid, p, y),
                              bp_bytes=0 if last else _nbytes(h_bp)))  # fmt: skip
    return out


# ---- torch's schedules, offline ---------------------------------------------------------


def schedule_actions(
    schedule: Schedule, ranks: int, m: int, per_rank: int = 1
) -> list[list[Action]]:
    """Each rank's compute actions (kind, stage, microbatch), in the order torch runs them.

    The schedule is built on a "fake" process group (construction only, nothing is sent)
    and the group is destroyed again, so the process can still start real pipelines.
    """
    if dist.is_initialized():  # the fake group must be the default one, and ours alone
        raise RuntimeError("schedule_actions needs a process without a process group")
    n = ranks * per_rank
    dist.init_process_group("fake", rank=0, world_size=ranks, store=FakeStore())
    try:
        cpu = torch.device("cpu")
        stages = [PipelineStage(nn.Linear(1, 1), s, n, cpu)
                  for s in stage_ids(schedule, 0, ranks, per_rank)]  # fmt: skip
        engine = SCHEDULES[schedule](
            stages if schedule.multi_stage else stages[0], m, loss_fn=lambda out, tgt: out
        )
        # Multi-stage schedules run pipeline_order_with_comms: the compute order is that
        # list's. GPipe and 1F1B run hard-coded loops; their pipeline_order only describes them.
        order = getattr(engine, "pipeline_order_with_comms", None) or engine.pipeline_order
    finally:
        dist.destroy_process_group()
    out: list[list[Action]] = []
    for r in range(ranks):
        acts = []
        for a in (a for a in order[r] if a is not None):
            for sub in a.sub_actions or (a,):  # OVERLAP_F_B runs its two parts in turn
                kind = sub.computation_type.value
                if kind in ("F", "B", "I", "W"):
                    acts.append((kind, sub.stage_index, sub.microbatch_index))
        out.append(acts)
    if not schedule.multi_stage:
        # 1F1B's pipeline_order numbers the last rank's forwards 1..M (a torch bug; the
        # loop runs 0..M-1). Both loops run each kind in microbatch order: renumber so.
        for acts in out:
            seen = {"F": 0, "B": 0}
            for k, (kind, s, _) in enumerate(acts):
                acts[k], seen[kind] = (kind, s, seen[kind]), seen[kind] + 1
    check_actions(out, n, m)
    return out


def check_actions(orders: list[list[Action]], n_stages: int, m: int) -> None:
    """Every stage on one rank; each (stage, microbatch) forwarded once and backwarded
    once: B, or I then W."""
    want = sorted([("F", s, i) for s in range(n_stages) for i in range(m)])
    fwd = sorted(a for acts in orders for a in acts if a[0] == "F")
    bwd = {k: sorted((s, i) for acts in orders for (kk, s, i) in acts if kk == k) for k in "BIW"}
    owners = {s: {r for r, acts in enumerate(orders) for (_, st, _) in acts if st == s}
              for s in range(n_stages)}  # fmt: skip
    ok = (
        fwd == want
        and bwd["I"] == bwd["W"]
        and sorted(bwd["B"] + bwd["I"]) == sorted((s, i) for _, s, i in want)
    )
    if not ok or any(len(v) != 1 for v in owners.values()):
        raise RuntimeError(f"torch's action lists miss or repeat work: {orders}")


# ---- replaying them ---------------------------------------------------------------------


def _send(link: Link | None, busy: dict, src: int, dst: int, nbytes: int, t: float) -> float:
    """When a message sent at `t` from rank src arrives at rank dst."""
    if link is None or src == dst:
        return t
    bandwidth, latency = link
    start = max(t, busy.get((src, dst), 0.0))  # one transfer at a time per direction
    busy[(src, dst)] = start + nbytes / bandwidth
    return busy[(src, dst)] + latency


def replay(
    times: list[StageTimes], orders: list[list[Action]], link: Link | None = None, batches: int = 4
) -> tuple[float, list[list[tuple]]]:
    """Seconds per batch in steady state, and each rank's (start, end, label) events."""
    ranks = len(orders)
    owner = {s: r for r, acts in enumerate(orders) for (_, s, _) in acts}
    last = len(times) - 1
    todo = [[(b, a) for b in range(batches) for a in [*acts, ("S", -1, -1)]] for acts in orders]
    ready: dict[tuple, float] = {}  # ("act"|"grad"|"I", batch, stage, mb) -> time, on its rank
    free, pos, links = [0.0] * ranks, [0] * ranks, {}
    events: list[list[tuple]] = [[] for _ in range(ranks)]
    step_end = [[0.0] * ranks for _ in range(batches)]
    cost = {"F": "bp_forward", "B": "bp_backward", "I": "bp_input", "W": "bp_weight"}

    def needs(b: int, kind: str, s: int, i: int) -> float | None:
        if kind == "S" or kind == "F" and s == 0:
            return 0.0
        return ready.get(({"F": "act", "W": "I"}.get(kind, "grad"), b, s, i))

    while any(p < len(t) for p, t in zip(pos, todo)):
        # Run the action that can start first: starts never go back in time, so each
        # link carries its messages in the order they were sent.
        best = None
        for r in range(ranks):
            if pos[r] < len(todo[r]):
                b, (kind, s, i) = todo[r][pos[r]]
                dep = needs(b, kind, s, i)
                if dep is not None and (best is None or max(free[r], dep) < best[0]):
                    best = (max(free[r], dep), r)
        if best is None:
            raise RuntimeError("the action lists deadlock")
        start, r = best
        b, (kind, s, i) = todo[r][pos[r]]
        pos[r] += 1
        if kind == "S":  # the rank's optimizer step, over all of its stages
            dur = sum(times[st].bp_update for st, o in owner.items() if o == r)
            free[r] = step_end[b][r] = start + dur
            events[r].append((start, free[r], "step"))
            continue
        end = free[r] = start + getattr(times[s], cost[kind])
        events[r].append((start, end, f"{s}{kind}{i}"))
        if kind == "F" and s == last:  # the loss is computed with the last forward
            ready[("grad", b, s, i)] = end
        elif kind == "F":
            t = _send(link, links, r, owner[s + 1], times[s].bp_bytes, end)
            ready[("act", b, s + 1, i)] = t
        elif kind in "BI":
            ready[("I", b, s, i)] = end
            if s > 0:
                t = _send(link, links, r, owner[s - 1], times[s - 1].bp_bytes, end)
                ready[("grad", b, s - 1, i)] = t
    return (max(step_end[-1]) - max(step_end[0])) / (batches - 1), events


def simulate_sid(
    times: list[StageTimes], messages: int, link: Link | None = None
) -> tuple[list[float], list[list[tuple]]]:
    """When the last stage finished each SID message, and per-stage (start, end, kind)."""
    free = [0.0] * len(times)
    events: list[list[tuple]] = [[] for _ in times]
    links: dict = {}
    ends = []
    for _ in range(messages):
        arrives = 0.0  # when this message reaches stage s
        for s, t in enumerate(times):
            start = max(free[s], arrives)
            fwd_end = start + t.sid_forward
            free[s] = fwd_end + t.sid_update
            events[s] += [(start, fwd_end, "forward"), (fwd_end, free[s], "backward+step")]
            arrives = _send(link, links, s, s + 1, t.sid_bytes, fwd_end)
        ends.append(free[-1])
    return ends, events


def samples_per_s(
    scheme: str,
    times: list[StageTimes],
    ranks: int,
    batch: int,
    m: int,
    link: Link | None = None,
    batches: int = 4,
) -> float:
    """Simulated steady-state samples/s of one scheme. `times` holds one entry per pipeline
    stage: `ranks` of them, times stages-per-rank for the multi-stage BP schedules."""
    mb = batch // m
    if scheme == "sid":  # the first quarter of the messages is the ramp
        n = max(batches * m, 8 * len(times))
        ends, _ = simulate_sid(times, n, link)
        return (n - n // 4) * mb / (ends[-1] - ends[n // 4 - 1])
    if scheme == "seq_sid":
        return mb / sum(t.sid_forward + t.sid_update for t in times)
    if scheme == "seq_bp":
        per_batch = sum(m * (t.bp_forward + t.bp_backward) + t.bp_update for t in times)
        return batch / per_batch
    orders = schedule_actions(Schedule(scheme), ranks, m, len(times) // ranks)
    return batch / replay(times, orders, link, batches)[0]


# ---- the bench's simulate mode ----------------------------------------------------------


def stages_per_rank(cfg: Config, scheme: str, ranks: int, m: int) -> int | None:
    """Pipeline stages per rank of one scheme at (S, M), or None where its constraints
    (sidpipe.config.check_schedule, and no more stages than blocks) are not met."""
    if scheme in ("sid", "seq_sid", "seq_bp"):
        return 1
    pipe = dataclasses.replace(cfg.pipeline, stages=ranks, microbatches=m, partition=None,
                               schedule=Schedule(scheme), stages_per_rank=None)  # fmt: skip
    train = dataclasses.replace(cfg.train, batch_size=cfg.bench.batch_size)
    try:
        c = dataclasses.replace(cfg, method=Method.bp, pipeline=pipe, train=train)
    except ConfigError:
        return None
    return c.pipeline.stages_per_rank


def simulated_rows(cfg: Config, link: Link | None = None) -> list[dict[str, Any]]:
    """SIMULATED S-device pipelines (every scheme of bench.schemes whose constraints hold)
    from per-stage costs measured on this one device. `link` defaults to
    pipeline.auto_bandwidth_gbs and LINK_LATENCY_S."""
    threads = torch.get_num_threads()
    affinity = set_threads(cfg, 0)  # measure as one stage process would run
    try:
        return _rows(cfg, link or (cfg.pipeline.auto_bandwidth_gbs * 1e9, LINK_LATENCY_S))
    finally:  # this process may go on to start real pipelines: leave it as it was
        torch.set_num_threads(threads)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


def _rows(cfg: Config, link: Link) -> list[dict[str, Any]]:
    device = select_device(cfg)
    data = load_data(cfg.data, cfg.seed)
    net = build_net(cfg, data)  # weights do not matter to timing: one net for every layout
    bench, pipe = cfg.bench, cfg.pipeline
    profiles: dict[int, list] = {}  # partition=auto: block costs per message size
    measured: dict[tuple, list[StageTimes]] = {}  # (stages, message size, cuts) -> times

    def layout(n: int, mb: int, sid: bool) -> tuple[list[StageTimes], Any]:
        c = copy.deepcopy(cfg)
        c.train.batch_size = mb
        if pipe.partition == "auto":  # balanced on this device at the message size
            if mb not in profiles:
                profiles[mb] = profile_blocks(c, data, net, device)
            c.pipeline.partition = best_cuts(profiles[mb], n, pipe.auto_bandwidth_gbs * 1e9)[0]
        elif pipe.partition is not None and len(pipe.partition) != n - 1:
            c.pipeline.partition = None  # cuts given for another stage count: uniform
        key = (n, mb, str(c.pipeline.partition))
        if key not in measured:
            measured[key] = measure_stage_times(c, data, net, device, mb, n, ("bp",))
        if sid and not measured[key][0].sid_forward:  # SID costs only where a row needs them
            sids = measure_stage_times(c, data, net, device, mb, n, ("sid",))
            measured[key] = [dataclasses.replace(t, sid_forward=u.sid_forward,
                                                 sid_update=u.sid_update, sid_bytes=u.sid_bytes)
                             for t, u in zip(measured[key], sids)]  # fmt: skip
        return measured[key], c.pipeline.partition

    rows = []
    for s in bench.stages:
        for m in bench.microbatches:
            for scheme in bench.schemes:
                per_rank = stages_per_rank(cfg, scheme, s, m)
                if per_rank is None or s * per_rank > net.n_blocks:
                    continue
                times, cuts = layout(s * per_rank, bench.batch_size // m, "sid" in scheme)
                rate = samples_per_s(scheme, times, s, bench.batch_size, m, link)
                rows.append({"scheme": scheme, "stages": s, "microbatches": m, "simulated": True,
                             "samples_per_s": rate, "stages_per_rank": per_rank,
                             "partition": cuts, "device": str(device),
                             "link": {"bandwidth_gbs": link[0] / 1e9, "latency_us": link[1] * 1e6},
                             "stage_times_ms": [t.ms() for t in times],
                             "stage_bytes": [{"sid": t.sid_bytes, "bp": t.bp_bytes}
                                             for t in times]})  # fmt: skip
    return rows
