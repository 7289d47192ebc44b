"""An event simulation of S-device pipelines from measured per-stage times (SIMULATED).

One device can still answer "what would S devices do": measure each stage's forward,
backward and update on that device (`measure_stage_times`), then replay the schedules as
dependency-driven events. Communication is modelled as free; every number this module
produces is labelled simulated wherever it is reported.

- SID: stage s handles message m after it finished message m-1 and stage s-1 finished
  m's forward; it sends after its forward and then runs backward + step (no flush).
- GPipe: all M forwards, then all M backwards in reverse order, then one step; flush.
- 1F1B: per stage, S-s-1 warm-up forwards, then one-forward-one-backward, then cool-down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sidpipe.config import Config
from sidpipe.data import Batches, DataBundle
from sidpipe.method.stage import SIDStage, autocast, build_optimizer
from sidpipe.models import BlockNet
from sidpipe.models.heads import uniform_prior
from sidpipe.models.partition import StageModule, partition_blocks
from sidpipe.runtime.io import timed_call


@dataclass
class StageTimes:
    sid_forward: float  # blocks + heads + losses, one SID message of B/M samples
    sid_update: float  # local backward + optimizer step of that message
    bp_forward: float  # blocks (+ final head on the last stage), one microbatch
    bp_backward: float  # one microbatch
    bp_update: float  # the optimizer step, once per batch


def _mean_pair(
    first, second, device: torch.device, iters: int, warmup: int = 2
) -> tuple[float, float]:
    """Mean time of `first` and of `second`, run as pairs (after `warmup` pairs)."""
    for _ in range(warmup):  # see SIDStage.warm_up_messages
        first()
        second()
    a = b = 0.0
    for _ in range(iters):
        a += timed_call(first, device)
        b += timed_call(second, device)
    return a / iters, b / iters


def _measure_stage(stage_mod: StageModule, cfg: Config, h, p, y, device, iters: int) -> StageTimes:
    sid = SIDStage(stage_mod, cfg, total_updates=1000, device=device)
    state: dict = {}

    def sid_fwd() -> None:
        state["out"] = sid.forward(h, p, y)

    def sid_upd() -> None:
        sid.update(state["out"][2])

    t_f, t_u = _mean_pair(sid_fwd, sid_upd, device, iters, sid.warm_up_messages)
    params = [q for b in stage_mod.blocks for q in b.parameters()]
    if stage_mod.is_last:
        params += list(stage_mod.heads[-1].parameters())
    opt, _ = build_optimizer(params, cfg.optim, 1000)
    inp = h.detach().requires_grad_(not stage_mod.is_first)

    def bp_fwd() -> None:  # under the same precision as the SID step (bf16 autocast or not)
        with autocast(device, cfg.precision):
            state["bp"] = stage_mod.bp_forward(inp)

    def bp_bwd() -> None:
        o = state["bp"]
        if stage_mod.is_last:
            F.cross_entropy(o.float(), y).backward()
        else:
            o.backward(torch.ones_like(o))  # any upstream gradient costs the same

    b_f, b_b = _mean_pair(bp_fwd, bp_bwd, device, iters)
    b_u = sum(timed_call(opt.step, device) for _ in range(iters)) / iters
    return StageTimes(t_f, t_u, b_f, b_b, b_u)


def measure_stage_times(
    cfg: Config,
    data: DataBundle,
    net: BlockNet,
    device: torch.device,
    microbatch: int,
    iters: int = 5,
) -> list[StageTimes]:
    """Per-stage times on one device, each stage's input taken from the previous stage."""
    x, y = next(iter(Batches(data.train, data, microbatch, True, cfg.seed).epoch(0)))
    h, y = x.to(device), y.to(device)
    p = uniform_prior(h.shape[0], data.num_classes, device)
    out = []
    for r in partition_blocks(net.n_blocks, cfg.pipeline.stages, cfg.pipeline.partition):
        stage_mod = StageModule(net, r).to(device)
        out.append(_measure_stage(stage_mod, cfg, h, p, y, device, iters))
        with torch.no_grad():
            h, p, _ = stage_mod(h, p)
    return out


# ---- schedules --------------------------------------------------------------------------


def simulate_sid(times: list[StageTimes], messages: int) -> tuple[float, list[list[tuple]]]:
    """Makespan of `messages` SID messages, and per-stage (start, end, kind) events."""
    s_n = len(times)
    free = [0.0] * s_n  # when each stage is next idle
    events: list[list[tuple]] = [[] for _ in range(s_n)]
    for _ in range(messages):
        ready = 0.0  # when this message's input is available to stage s
        for s, t in enumerate(times):
            start = max(free[s], ready)
            fwd_end = start + t.sid_forward
            end = fwd_end + t.sid_update
            events[s] += [(start, fwd_end, "forward"), (fwd_end, end, "backward+step")]
            free[s], ready = end, fwd_end
    return max(free), events


def _run_ops(times: list[StageTimes], order: list[list[tuple[str, int]]]) -> tuple[float, list]:
    """Execute per-stage op orders ('F'|'B', microbatch) respecting cross-stage dependencies."""
    s_n = len(times)
    done: dict[tuple[str, int, int], float] = {}
    pos, free = [0] * s_n, [0.0] * s_n
    events: list[list[tuple]] = [[] for _ in range(s_n)]
    remaining = sum(len(o) for o in order)
    while remaining:
        progressed = False
        for s in range(s_n):
            while pos[s] < len(order[s]):
                kind, m = order[s][pos[s]]
                dep = ("F", s - 1, m) if kind == "F" else ("B", s + 1, m)
                if kind == "F" and s == 0 or kind == "B" and s == s_n - 1:
                    dep_t = done.get(("F", s, m), 0.0) if kind == "B" else 0.0
                elif dep in done:
                    dep_t = done[dep]
                else:
                    break
                dur = times[s].bp_forward if kind == "F" else times[s].bp_backward
                start = max(free[s], dep_t)
                done[(kind, s, m)] = free[s] = start + dur
                events[s].append((start, start + dur, "forward" if kind == "F" else "backward"))
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocked (bad op order)")
    flush = max(free)
    for s, t in enumerate(times):  # every stage steps after the flush
        events[s].append((flush, flush + t.bp_update, "step"))
    return flush + max(t.bp_update for t in times), events


def gpipe_order(stages: int, m: int) -> list[list[tuple[str, int]]]:
    return [[("F", i) for i in range(m)] + [("B", i) for i in reversed(range(m))]] * stages


def onef1b_order(stages: int, m: int) -> list[list[tuple[str, int]]]:
    orders = []
    for s in range(stages):
        warm = min(stages - s - 1, m)
        ops = [("F", i) for i in range(warm)]
        f, b = warm, 0
        while b < m:
            if f < m:
                ops.append(("F", f))
                f += 1
            ops.append(("B", b))
            b += 1
        orders.append(ops)
    return orders


def simulate(times: list[StageTimes], batch: int, m: int, batches: int = 8) -> dict[str, float]:
    """Simulated samples/s of each scheme over `batches` batches of `batch` samples."""
    mb = batch // m
    sid_t, _ = simulate_sid(times, batches * m)
    gpipe_t, _ = _run_ops(times, gpipe_order(len(times), m))
    f1b_t, _ = _run_ops(times, onef1b_order(len(times), m))
    seq_sid = sum(t.sid_forward + t.sid_update for t in times) / mb
    seq_bp = (
        m * sum(t.bp_forward + t.bp_backward for t in times) + sum(t.bp_update for t in times)
    ) / batch
    return {
        "sid_samples_per_s": batches * batch / sid_t,
        "gpipe_samples_per_s": batch / gpipe_t,
        "1f1b_samples_per_s": batch / f1b_t,
        "seq_sid_samples_per_s": 1 / seq_sid,
        "seq_bp_samples_per_s": 1 / seq_bp,
    }
