"""What one SID stage computes: forward its modules, then update each from its local loss.

The single-process blockwise trainer is a `SIDLearner` over all blocks; a pipeline stage is a
`SIDLearner` over its slice. Both run this same code, so the pipeline can only differ from
the sequential reference through what the runtime moves (docs/design.md §8).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidpipe.config import Config, OptimConfig, Precision, TopkConsistency
from sidpipe.errors import ConfigError
from sidpipe.method.graphs import WARMUP, StepGraphs
from sidpipe.method.loss import sid_loss
from sidpipe.models.heads import sparse_prior
from sidpipe.models.partition import Stage


class Probe(Protocol):
    """What a stage needs of a memory probe (runtime/memory.py's MemoryProbe)."""

    def attach(self, blocks: nn.ModuleList) -> None: ...

    def sample(self) -> None: ...


def build_optimizer(
    params: Iterable[nn.Parameter],
    cfg: OptimConfig,
    total_steps: int,
    lr_device: torch.device | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """lr_device: a graph-safe optimizer (CUDA graphs): lr is a tensor on that device, which
    schedules update in place so a captured step reads it, and Adam keeps its step on device."""
    params = list(params)
    # One fused kernel per step instead of a loop of elementwise ops: the update is paid per
    # message in SID, so its cost matters (measured on CPU, 4M params: 2.9 ms vs 18.8 ms).
    kw: dict = {"fused": True} if cfg.fused and params else {}
    lr: float | Tensor = cfg.lr
    if lr_device is not None:
        lr = torch.tensor(cfg.lr, dtype=torch.float32, device=lr_device)
    if cfg.name in ("adam", "adamw") and lr_device is not None:
        kw["capturable"] = lr_device.type == "cuda"
    if cfg.name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(
            params, lr=lr, weight_decay=cfg.weight_decay, **kw
        )
    elif cfg.name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, **kw)
    else:
        opt = torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kw
        )
    sched = None
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda step: (
                0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
            ),
        )
    return opt, sched


def check_graph_device(cfg: Config, device: torch.device) -> None:
    if cfg.pipeline.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"pipeline.cuda_graphs=true needs a CUDA device; this run is on {device}")


def autocast(
    device: torch.device, precision: Precision, cache: bool = True
) -> contextlib.AbstractContextManager:
    """bf16 autocast for the blocks and heads; losses and beliefs are cast to fp32 by hand.
    cache=False under CUDA graphs: autocast's weight-cast cache must not outlive a capture."""
    if precision is Precision.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


class SIDLearner:
    """Blocks, heads and the optimizer of the SID modules of one stage."""

    def __init__(
        self,
        stage: Stage,
        cfg: Config,
        total_updates: int,
        device: torch.device,
        probe: Probe | None = None,
    ):
        graphs = cfg.pipeline.cuda_graphs
        check_graph_device(cfg, device)
        if device.type == "cuda" and device.index is None:  # "cuda" -> "cuda:N": comparable
            device = torch.device("cuda", torch.cuda.current_device())
        self.stage = stage.to(device)
        self.cfg = cfg
        self.device = device
        self.first = stage.first
        # top-k beliefs: every module but the network's first reads a rebuilt prior, and with
        # sid.topk_consistency=partition its consistency term covers only what was sent
        partition = cfg.sid.topk_consistency is TopkConsistency.partition
        self.sent_k = stage.belief_topk if partition else None
        # One optimizer for all of the stage's modules (unless optim.per_module). Adam, AdamW
        # and SGD update every element independently, so this is exactly one optimizer per
        # module, in one fused kernel per step instead of one per module (measured: half the
        # update time on CPU; tests/method/test_learner.py checks the equality).
        groups = (
            [[*b.parameters(), *h.parameters()] for b, h in zip(stage.blocks, stage.heads)]
            if cfg.optim.per_module
            else [list(stage.parameters())]
        )
        built = [
            build_optimizer(g, cfg.optim, total_updates, lr_device=device if graphs else None)
            for g in groups
        ]
        self.optimizers = [opt for opt, _ in built]
        self.schedulers = [sched for _, sched in built]
        self.graphs = (
            StepGraphs(self._forward, self._backward, self._step, self._zero_grad)
            if graphs
            else None
        )
        self.messages = 0  # training messages seen (for sid.accumulate_steps)
        self.probe = probe
        if probe is not None:
            probe.attach(stage.blocks)

    @property
    def warm_up_messages(self) -> int:
        """Messages before a step runs at its steady cost (allocator, lazy optimizer state,
        and with CUDA graphs the eager warm-up and the capture): what timing must skip."""
        return 2 + (WARMUP if self.graphs is not None else 0)

    @property
    def n_modules(self) -> int:
        return len(self.stage.blocks)

    def forward(
        self, h: Tensor, p: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """Training forward: (h_out, p_out) to send on (detached), per-module losses and logits."""
        if self.graphs is not None:
            if not self.graphs.captured:
                self._graph_safe_lr()
            return self.graphs.forward(h, p, y)
        return self._forward(h, p, y)

    def _graph_safe_lr(self) -> None:
        """A restored checkpoint may hand lr back as a float or a CPU tensor; a captured step
        must read it from a device tensor that the schedule updates in place."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                lr = group["lr"]
                if not (isinstance(lr, Tensor) and lr.device == self.device):
                    group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=self.device)

    def _forward(
        self, h: Tensor, p: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        sid = self.cfg.sid
        losses, logits_all = [], []
        self.stage.train()
        with autocast(self.device, self.cfg.precision, cache=self.graphs is None):
            for i, (block, head) in enumerate(zip(self.stage.blocks, self.stage.heads)):
                if i:  # as between stages (drivers/sid.py to_wire): the same compression
                    p = sparse_prior(p, self.stage.belief_topk)
                # Stop-gradient on both inputs: a module's loss reaches only its block and head.
                h = block(h.detach())
                z = head(h, p.detach())
                losses.append(
                    sid_loss(
                        z, y, p, sid.alpha, sid.kl_direction, sid.label_smoothing,
                        self.sent_k if i or self.first else None,
                    )
                )  # fmt: skip
                logits_all.append(z)
                p = F.softmax(z.float(), dim=-1).detach()
        return h.detach(), p, losses, logits_all

    def update(self, losses: list[Tensor]) -> None:
        """Local backward and optimizer step of every module (after the send, so it overlaps)."""
        self.messages += 1
        stepping = self.messages % self.cfg.sid.accumulate_steps == 0
        if self.graphs is not None:  # backward and step replayed as one graph (k == 1)
            self.graphs.update(losses)
        else:
            self._backward(losses)
        if self.probe is not None:  # gradients are alive now, activations not yet freed
            self.probe.sample()
        if stepping:
            if self.graphs is None:
                self._step()
                self._zero_grad()
            for sched in self.schedulers:
                if sched is not None:
                    sched.step()

    def _backward(self, losses: list[Tensor]) -> None:
        k = self.cfg.sid.accumulate_steps
        for loss in losses:
            (loss / k if k > 1 else loss).backward()

    def _step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def _zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_forward(self, h: Tensor, p: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        self.stage.eval()
        with autocast(self.device, self.cfg.precision):
            h, p, logits = self.stage(h, p)  # models.heads.belief_chain
        return h, p.float(), [z.float() for z in logits]
