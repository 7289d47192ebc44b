"""The contract both rank runners (SID and BP) keep, and what they share.

A runner is built on every rank with (ctx, cfg, run_dir), consumes the run cadence
(runtime/cadence.py; SID through messages), and returns its per-stage numbers from `run()`.
This base holds what is not specific to a method: the data, memory probe, tracer, metrics
writer, run state, checkpoint manager, fault hook, the train-loss line with its NaN and
peer-failure checks, the global-name state dict and the per-stage result.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sidpipe.config import Config, to_dict
from sidpipe.data import load_data, text_bytes_per_token
from sidpipe.errors import TrainingError
from sidpipe.models import build_net
from sidpipe.models.partition import Stage, partition_blocks
from sidpipe.runtime.cadence import RunState
from sidpipe.runtime.checkpoint import CheckpointManager
from sidpipe.runtime.dist import DistContext
from sidpipe.runtime.logger import stage_logger
from sidpipe.runtime.memory import MemoryProbe
from sidpipe.runtime.preempt import Preemption
from sidpipe.runtime.resume import check_not_past
from sidpipe.runtime.trace import Tracer
from sidpipe.tokenizer import keep_in_run

SPLITS = ("test", "val")  # evaluation splits, in the order every driver runs them


class PeerFailure(RuntimeError):
    """Another stage published a failure on the control plane."""


class Fault:
    """Test hook: SIDPIPE_FAULT='stage=1,step=5,kind=raise|nan|kill|abort' injects one fault
    (abort: a native crash, as an abort in a C++ thread would end the process); with
    ',attempt=K' only in the K-th attempt of a restarted run (0: the first), else in every."""

    def __init__(self, spec: str):
        fields = dict(item.split("=", 1) for item in spec.split(","))
        self.stage, self.step, self.kind = int(fields["stage"]), int(fields["step"]), fields["kind"]
        self.attempt = int(fields["attempt"]) if "attempt" in fields else None

    @classmethod
    def from_env(cls, rank: int) -> Fault | None:
        spec = os.environ.get("SIDPIPE_FAULT")
        fault = cls(spec) if spec else None
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if fault is None or fault.stage != rank:
            return None
        return fault if fault.attempt in (None, attempt) else None

    def apply(self, step: int, h: Tensor) -> Tensor:
        if step != self.step:
            return h
        if self.kind == "raise":
            raise RuntimeError("injected fault (SIDPIPE_FAULT)")
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "abort":
            os.abort()
        if self.kind == "nan":
            return h * float("nan")
        raise ValueError(f"SIDPIPE_FAULT kind={self.kind!r} must be raise, nan, kill or abort")


class LossMeter:
    """Sums losses on the device; `mean()` is the only host sync, at log intervals."""

    def __init__(self, n: int, device: torch.device):
        self.sum = torch.zeros(n, device=device)
        self.count = 0

    def add(self, losses: list[Tensor]) -> None:
        with torch.no_grad():
            self.sum += torch.stack([loss.detach().float().reshape(()) for loss in losses])
        self.count += 1

    def mean(self, where: str) -> list[float] | None:
        """The mean since the last call (None if nothing was added); non-finite raises."""
        if not self.count:
            return None
        mean = (self.sum / self.count).tolist()
        self.sum.zero_()
        self.count = 0
        bad = [v for v in mean if not math.isfinite(v)]
        if bad:
            raise TrainingError(f"{where}: non-finite loss {bad[0]}")
        return mean


def global_state_dict(
    blocks: nn.ModuleList, heads: dict[int, nn.Module], start: int
) -> dict[str, Tensor]:
    """Parameters under the whole network's names (blocks.{i}, heads.{i}): blocks of a
    stage that starts at block `start`, and the heads given by their global index."""
    out = {}
    for j, block in enumerate(blocks):
        out.update({f"blocks.{start + j}.{k}": v for k, v in block.state_dict().items()})
    for i, head in heads.items():
        out.update({f"heads.{i}.{k}": v for k, v in head.state_dict().items()})
    return out


class RankRunner:
    """Common state of one pipeline stage; subclasses build the method and implement run()."""

    def __init__(self, ctx: DistContext, cfg: Config, run_dir: Path):
        self.ctx, self.cfg, self.run_dir = ctx, cfg, run_dir
        self.first, self.last = ctx.rank == 0, ctx.rank == ctx.world - 1
        self.state = RunState()
        self.tracer = Tracer(ctx.rank, enabled=cfg.pipeline.trace)
        self.data = load_data(cfg.data, cfg.seed)  # every rank: shapes, sizes, labels
        if self.first and self.data.tokenizer is not None:  # export carries the run's copy
            keep_in_run(self.data.tokenizer, run_dir)
        self.fault = Fault.from_env(ctx.rank)
        self.metrics = stage_logger(ctx.rank, run_dir, to_dict(cfg), cfg.logger)
        # a preemption signal (stage_main installs the process's handler here); run() sets
        # `preempted` when the run stopped early at one, after saving a checkpoint
        self.preemption = Preemption()
        self.preempted = False

    def build_stages(
        self, stage_ids: list[int], check: Callable[[nn.Module], None] | None = None
    ) -> list[Stage]:
        """This rank's pipeline stages (slices of the network; the model is cut into
        cfg.stage_count stages). The memory baseline is taken before the model exists.
        check(net): the method's own layout checks, on the whole network."""
        self.memory = MemoryProbe(self.ctx.device)
        net = build_net(self.cfg, self.data)
        if check is not None:
            check(net)
        ranges = partition_blocks(net.n_blocks, self.cfg.stage_count, self.cfg.pipeline.partition)
        self.stage_ids = stage_ids
        self.blocks = [i for s in stage_ids for i in ranges[s]]  # this rank's, in stage order
        self.n_depths = net.n_blocks
        self.partition = [[r.start, r.stop] for r in ranges]
        self.checkpoints = CheckpointManager(
            self.cfg, self.run_dir, self.partition, self.ctx.rank, self.ctx.world, self.ctx.store
        )
        return [Stage(net, ranges[s]) for s in stage_ids]  # only these blocks stay alive

    def resume(self, module: nn.Module, optimizers: list[Any], schedulers: list[Any]) -> None:
        restored = self.checkpoints.restore(module, optimizers, schedulers)
        if restored is not None:
            self.state, path = restored
            check_not_past(path, self.state.step, getattr(self, "n_steps", self.state.step))
            print(f"{self.ctx.tag} resumed from {path} at step {self.state.step}", flush=True)

    def log_train(self, meter: LossMeter, epoch: int) -> None:
        """At log intervals: the loss line (if this stage has losses), NaN check, peers."""
        mean = meter.mean(f"step {self.state.step} (epoch {epoch}, modules "
                          f"{self.blocks})")  # fmt: skip
        if mean is not None:
            self.metrics.log({"kind": "train", "stage": self.ctx.rank, "step": self.state.step,
                              "epoch": epoch, "loss": mean,
                              "modules": self.blocks})  # fmt: skip
        peer = self.ctx.peer_failure()
        if peer is not None:
            raise PeerFailure(f"stopping: {peer}")

    def print_eval(self, record: dict[str, Any]) -> None:
        bpb = record.get("test_bpb_per_depth")  # a language model
        more = f"; test bits/byte {bpb[-1]:.4f}" if bpb else ""
        print(f"{self.ctx.tag} epoch {record['epoch']} step {record['step']}: test accuracy "
              f"{record['test_per_depth'][-1]:.4f}{more}", flush=True)  # fmt: skip

    def result(self, wall: float, busy_s: float, **numbers: Any) -> dict[str, Any]:
        """This stage's public numbers, plus the '_' fields rank 0 reads (summary.py)."""
        return {
            "stage": self.ctx.rank,
            "modules": self.blocks,
            "busy_fraction": busy_s / wall,
            **numbers,
            "train_messages": self.state.step,
            **self.memory.report(),
            "wall_s": wall,
            "_train_samples": self.state.samples,
            "_label_noise_rate": self.data.noise_rate,
            "_train_s": self.state.train_s,
            "_text_bytes_per_token": text_bytes_per_token(self.data),
            "_sink": self.last,  # holds the last stage: its history and samples are the run's
            "_history": self.state.history.epochs if self.last else None,
            "_trace": self.tracer.events(),
            "_preempted": self.preempted,
        }
