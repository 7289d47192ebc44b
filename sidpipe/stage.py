"""What one SID stage computes: forward its modules, then update each from its local loss.

The single-process blockwise trainer is a `SIDStage` over all blocks; a pipeline stage is a
`SIDStage` over its slice. Both run this same code, so the pipeline can only differ from
the sequential reference through what the runtime moves (DESIGN §1 "key property").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidpipe.config import Config, OptimConfig, Precision
from sidpipe.loss import sid_loss
from sidpipe.memory import MemoryProbe
from sidpipe.models.partition import StageModule


def build_optimizer(
    params: Iterable[nn.Parameter], cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    params = list(params)
    # One fused kernel per step instead of a loop of elementwise ops: the update is paid per
    # message in SID, so its cost matters (measured on CPU, 4M params: 2.9 ms vs 18.8 ms).
    fused = {"fused": True} if cfg.fused and params else {}
    if cfg.name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused
        )
    elif cfg.name == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    else:
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused
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


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast for the blocks and heads; losses and beliefs are cast to fp32 by hand."""
    if precision is Precision.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class SIDStage:
    """Blocks, heads and the optimizer of the SID modules of one stage."""

    def __init__(
        self,
        stage: StageModule,
        cfg: Config,
        total_updates: int,
        device: torch.device,
        probe: MemoryProbe | None = None,
    ):
        self.stage = stage.to(device)
        self.cfg = cfg
        self.device = device
        self.first = stage.first
        # One optimizer for all of the stage's modules. Adam, AdamW and SGD update every
        # element independently, so this is exactly one optimizer per module, in one fused
        # kernel per step instead of one per module (measured: half the update time on CPU).
        opt, sched = build_optimizer(stage.parameters(), cfg.optim, total_updates)
        self.optimizers, self.schedulers = [opt], [sched]
        self.messages = 0  # training messages seen (for sid.accumulate_steps)
        self.probe = probe
        if probe is not None:
            probe.attach(stage.blocks)

    @property
    def n_modules(self) -> int:
        return len(self.stage.blocks)

    def forward(
        self, h: Tensor, p: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """Training forward: (h_out, p_out) to send on (detached), per-module losses and logits."""
        sid = self.cfg.sid
        losses, logits_all = [], []
        self.stage.train()
        with autocast(self.device, self.cfg.precision):
            for block, head in zip(self.stage.blocks, self.stage.heads):
                # Stop-gradient on both inputs: a module's loss reaches only its block and head.
                h = block(h.detach())
                z = head(h, p.detach())
                losses.append(sid_loss(z, y, p, sid.alpha, sid.kl_direction, sid.label_smoothing))
                logits_all.append(z)
                p = F.softmax(z.float(), dim=-1).detach()
        return h.detach(), p, losses, logits_all

    def update(self, losses: list[Tensor]) -> None:
        """Local backward and optimizer step of every module (after the send, so it overlaps)."""
        k = self.cfg.sid.accumulate_steps
        for loss in losses:
            (loss / k if k > 1 else loss).backward()
        self.messages += 1
        if self.probe is not None:  # gradients are alive now, activations not yet freed
            self.probe.sample()
        if self.messages % k == 0:
            for opt, sched in zip(self.optimizers, self.schedulers):
                opt.step()
                opt.zero_grad(set_to_none=True)
                if sched is not None:
                    sched.step()

    @torch.no_grad()
    def eval_forward(self, h: Tensor, p: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        self.stage.eval()
        with autocast(self.device, self.cfg.precision):
            h, p, logits = self.stage(h, p)  # models.heads.belief_chain
        return h, p.float(), [z.float() for z in logits]
