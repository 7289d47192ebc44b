"""`pipeline.partition=auto`: measure every block's SID step, then cut to balance the stages.

Each block is timed as the stage loop runs it (forward block + head + loss, local backward,
optimizer step: a one-module `SIDLearner`) on the real device, at the configured batch, with
the stage's thread count. A stage's predicted time is the sum of its blocks plus the cost of
serialising its output message (bytes / `pipeline.auto_bandwidth_gbs`). The cut points that
minimise the slowest stage are found exactly by dynamic programming over contiguous splits.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sidpipe.config import Config
from sidpipe.data import DataBundle, load_data, shuffled_batches
from sidpipe.drivers.summary import AUTO_PLAN_FILE
from sidpipe.method.learner import SIDLearner
from sidpipe.models import BlockNet, build_net
from sidpipe.models.partition import Stage
from sidpipe.runtime.device import local_stage_count, select_device, stage_threads
from sidpipe.runtime.io import atomic_write_json, timed_call
from sidpipe.runtime.wire import wire_nbytes

log = logging.getLogger("sidpipe.balance")


@dataclass
class BlockCost:
    seconds: float  # one training message through this block's SID module
    out_bytes: int  # h + belief + labels sent after this block


def profile_blocks(
    cfg: Config, data: DataBundle, net: BlockNet, device: torch.device, iters: int = 6
) -> list[BlockCost]:
    x, y = next(iter(shuffled_batches(data, cfg.train.batch_size, cfg.seed).epoch(0)))
    h, y = x.to(device), y.to(device)
    p = net.prior(h).float()  # uniform: (B, K), or (B, T, V) for a language model
    costs = []
    for i in range(net.n_blocks):
        stage = SIDLearner(Stage(net, range(i, i + 1)), cfg, total_updates=1000, device=device)
        seconds, h, p = _time_block(stage, h, p, y, device, iters)
        costs.append(BlockCost(seconds, wire_nbytes(cfg, h, p, y)))  # as sent: bf16, top-k
    return costs


def message_step(stage: SIDLearner, h, p, y) -> tuple[Callable[[], None], dict]:
    """One TRAIN message as the stage loop runs it: forward (blocks + heads + losses), then
    the local backward and optimizer step. Whatever the stage's modules hold, their heads
    included, is in what is timed. Returns the step and the dict its forward output lands in."""
    out: dict = {}

    def step() -> None:
        out["fwd"] = stage.forward(h, p, y)
        stage.update(out["fwd"][2])

    return step, out


def _time_block(stage: SIDLearner, h, p, y, device: torch.device, iters: int):
    """Median seconds of one message's forward + update, and the block's output (h, p)."""
    step, out = message_step(stage, h, p, y)
    for _ in range(stage.warm_up_messages):
        step()
    times = sorted(timed_call(step, device) for _ in range(iters))
    return times[len(times) // 2], out["fwd"][0], out["fwd"][1]


def best_cuts(
    costs: list[BlockCost], stages: int, bandwidth: float
) -> tuple[list[int], list[float]]:
    """Cut points minimising the slowest stage; returns (cuts, predicted seconds per stage)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c.seconds)

    def stage_time(a: int, b: int) -> float:  # blocks a..b-1; the last stage sends nothing
        send = costs[b - 1].out_bytes / bandwidth if b < n else 0.0
        return prefix[b] - prefix[a] + send

    # best[s][b]: the smallest possible slowest-stage time covering blocks 0..b-1 with s stages
    best = [[math.inf] * (n + 1) for _ in range(stages + 1)]
    arg = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for b in range(s, n + 1):
            for a in range(s - 1, b):
                t = max(best[s - 1][a], stage_time(a, b))
                if t < best[s][b]:
                    best[s][b], arg[s][b] = t, a
    bounds = [n]
    for s in range(stages, 0, -1):
        bounds.append(arg[s][bounds[-1]])
    bounds.reverse()
    return bounds[1:-1], [stage_time(a, b) for a, b in zip(bounds, bounds[1:])]


def auto_partition(
    cfg: Config, data: DataBundle, net: BlockNet, device: torch.device
) -> dict[str, Any]:
    """Measure, balance, print; returns {cuts, block_step_ms, predicted_stage_ms}."""
    torch.set_num_threads(stage_threads(cfg, local_stage_count(cfg)))  # as a stage will run
    costs = profile_blocks(cfg, data, net, device)
    cuts, predicted = best_cuts(costs, cfg.stage_count, cfg.pipeline.auto_bandwidth_gbs * 1e9)
    ms = ", ".join(f"{c.seconds * 1e3:.2f}" for c in costs)
    log.info("pipeline.partition=auto: block step times [ms]: %s", ms)
    print(
        f"pipeline.partition=auto -> {cuts}; predicted stage times [ms]: "
        + ", ".join(f"{t * 1e3:.2f}" for t in predicted),
        flush=True,
    )
    return {
        "cuts": cuts,
        "block_step_ms": [c.seconds * 1e3 for c in costs],
        "predicted_stage_ms": [t * 1e3 for t in predicted],
    }


def plan_partition(cfg: Config, run_dir: Path, local_rank: int = 0) -> Config:
    """`pipeline.partition=auto` -> concrete cut points, measured on this process's device.
    What was measured and predicted goes to run_dir/partition_auto.json: the summary sets
    each stage's measured step time beside its prediction. Called once per run, by the
    launcher, or by rank 0 under torchrun (drivers/launch.py)."""
    if cfg.pipeline.partition != "auto":
        return cfg
    data = load_data(cfg.data, cfg.seed)
    plan = auto_partition(cfg, data, build_net(cfg, data), select_device(cfg, local_rank))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / AUTO_PLAN_FILE, plan)
    cfg = copy.deepcopy(cfg)
    cfg.pipeline.partition = plan["cuts"]
    return cfg
