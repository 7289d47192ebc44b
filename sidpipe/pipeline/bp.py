"""The backprop baseline pipeline: GPipe / 1F1B from `torch.distributed.pipelining`.

One process per stage, each hosting a `PipelineStage` over the same contiguous blocks the SID
pipeline uses (`partition_blocks`); the last stage also runs the final head (fed the uniform
prior) and the loss. The engine decides the order of forwards, backwards and p2p ops; this
module only feeds it, steps the optimizer once per batch, evaluates, and measures.

Choices (see the report in the README):
- Full batches only: the schedules need every microbatch to have the shape of the first, so the
  last partial batch of an epoch is dropped (`Batches(drop_last=True)`). With a training set
  that is a multiple of `train.batch_size`, or `train.max_steps` inside the first epoch, this is
  step for step the single-process `Backprop` trainer with gradient accumulation.
- Loss = cross_entropy / M per microbatch with `scale_grads=False`: the same gradient, computed
  in the same order, as `Backprop.step`'s `(loss / m).backward()`.
- Rank 0 feeds the inputs; the last rank feeds the targets from its own copy of the data order
  (labels only), so no label traffic crosses the pipeline.
- Evaluation: forward only through the stages (plain send/recv on a separate process group,
  one header + activation per batch); the last stage counts the hits.
- Bytes: summed from the tensors of the send ops the engine builds (`get_fwd_send_ops` /
  `get_bwd_send_ops`), not from a formula. Evaluation traffic is counted apart.
- Time: a per-stage clock splits the run into forward / backward / loss / optimizer / eval
  (busy), data (preparing batches), and recv-wait / send-wait (the rest: blocked on a
  neighbour, or the engine's own overhead). Under 1F1B the engine fuses a send and a recv into
  one batched op; the wait for it counts as recv-wait. The bubble is measured inside
  `schedule.step` from the second step on (the first also infers the p2p shapes).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from sidpipe import checkpoint
from sidpipe.config import Config, Schedule, to_dict
from sidpipe.data import Batches, DataBundle, load_data
from sidpipe.logger import stage_logger
from sidpipe.loss import at_least_fp32
from sidpipe.memory import MemoryProbe
from sidpipe.metrics import save_state
from sidpipe.models.partition import StageModule, partition_blocks
from sidpipe.pipeline.dist import DistContext
from sidpipe.pipeline.report import handover
from sidpipe.pipeline.sid import SPLITS, Fault, PeerFailure
from sidpipe.pipeline.trace import Tracer
from sidpipe.stage import autocast, build_optimizer
from sidpipe.trainer import (
    History,
    TrainingError,
    build_net,
    eval_splits,
    restore_schedulers,
    sched_state,
    train_batches,
)

# Clock states (also the trace's span names). Busy as in the SID runner: compute, not data
# preparation; "data" is neither busy nor waiting.
BUSY = ("forward", "backward", "loss", "optimizer", "eval")
COMPUTE = ("forward", "backward", "loss")  # what the schedule itself computes
UNTRACED = ("setup", "done")
HEADER_LEN = 16
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_EVAL_BATCH, _EVAL_END = 1, 2


def full_batch_steps(cfg: Config, data: DataBundle) -> tuple[int, int]:
    """(full batches per epoch, total optimizer steps) of a BP pipeline run."""
    per_epoch = len(data.train) // cfg.train.batch_size
    total = cfg.train.epochs * per_epoch
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    return per_epoch, total


def check_bp_layout(cfg: Config, data: DataBundle, net: nn.Module) -> None:
    """What a BP pipeline needs beyond the SID checks; raised before any process starts
    (launch.check_layout) and again on every rank (torchrun skips the launcher's check)."""
    if not hasattr(net, "blocks"):
        raise TrainingError(
            "sid.variant=shared builds the reference repo's shared-extractor network, which has "
            "no blocks to cut into stages: use sid.variant=blockwise for a BP pipeline"
        )
    if full_batch_steps(cfg, data)[0] == 0:
        raise TrainingError(
            f"the training split has {len(data.train)} samples, fewer than "
            f"train.batch_size={cfg.train.batch_size}: a BP pipeline trains full batches only"
        )


def label_batches(split_batches: Batches, data: DataBundle) -> Batches:
    """The same batches (order, sizes) as `split_batches`, cheap: images cut to one pixel.

    The sample order depends only on (seed, epoch), so the labels match the full batches the
    first stage iterates exactly; augmentation touches only the images.
    """
    split = split_batches.split
    tiny = dataclasses.replace(split, x=split.x[:, :, :1, :1])
    return Batches(
        tiny,
        data,
        split_batches.batch_size,
        shuffle=split_batches.shuffle,
        seed=split_batches.seed,
        augment=False,
        drop_last=split_batches.drop_last,
    )


class Clock:
    """Splits a stage's wall time into named states; optional trace spans per state."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self.totals: dict[str, float] = {}
        self.state = "setup"
        self.t = time.perf_counter()

    def enter(self, state: str) -> None:
        now = time.perf_counter()
        if state == self.state:
            return
        d = now - self.t
        self.totals[self.state] = self.totals.get(self.state, 0.0) + d
        if d > 0 and self.state not in UNTRACED:
            self.tracer.add(self.state, self.t, now)
        self.state, self.t = state, now

    def total(self, states: tuple[str, ...]) -> float:
        """Time spent in `states` so far, the current state included up to now."""
        out = sum(self.totals.get(s, 0.0) for s in states)
        if self.state in states:
            out += time.perf_counter() - self.t
        return out


class BPStageModule(nn.Module):
    """What the engine runs on one stage: the blocks (and on the last stage the final head)."""

    def __init__(self, stage: StageModule, cfg: Config, device: torch.device, fault: Fault | None):
        super().__init__()
        self.stage = stage
        self.device, self.precision = device, cfg.precision
        self.fault = fault
        self.step = 0  # set by the runner before each schedule step (for the fault hook)

    def forward(self, h: Tensor) -> Tensor:
        if self.fault is not None:
            h = self.fault.apply(self.step, h)
        with autocast(self.device, self.precision):
            out = self.stage.bp_forward(h)
        # gloo sends contiguous tensors only (a conv block can hand over a strided view)
        return at_least_fp32(out) if self.stage.is_last else out.contiguous()


class CountingStage(PipelineStage):
    """A PipelineStage that counts the bytes of every tensor the schedule sends and clocks
    its compute; the schedules call these methods, so the numbers come from the engine."""

    def __init__(self, *args: Any, clock: Clock, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.bytes_forward = 0
        self.bytes_backward = 0
        self.sends = 0

    def _count(self, ops: list[dist.P2POp], forward: bool) -> list[dist.P2POp]:
        n = sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
        if forward:
            self.bytes_forward += n
        else:
            self.bytes_backward += n
        self.sends += len(ops)
        return ops

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count(super().get_fwd_send_ops(fwd_chunk_id), forward=True)

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count(super().get_bwd_send_ops(bwd_chunk_id), forward=False)

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_fwd_recv_ops(fwd_chunk_id)
        if ops:
            self.clock.enter("recv-wait")
        return ops

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_bwd_recv_ops(bwd_chunk_id)
        if ops:
            self.clock.enter("recv-wait")
        return ops

    def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        self.clock.enter("forward")
        try:
            return super().forward_one_chunk(*args, **kwargs)
        finally:
            self.clock.enter("send-wait")

    def backward_one_chunk(self, *args: Any, **kwargs: Any) -> None:
        self.clock.enter("backward")
        try:
            return super().backward_one_chunk(*args, **kwargs)
        finally:
            self.clock.enter("send-wait")


class BPStageRunner:
    def __init__(self, ctx: DistContext, cfg: Config, run_dir: Path):
        self.ctx, self.cfg, self.run_dir = ctx, cfg, run_dir
        self.first, self.last = ctx.rank == 0, ctx.rank == ctx.world - 1
        self.step = 0  # optimizer steps done (= batches trained)
        if ctx.staged:
            raise TrainingError(
                "method=bp pipelines send device tensors through torch.distributed.pipelining, "
                "which gloo cannot do for CUDA tensors: use pipeline.transport=nccl (or auto), "
                "or device=cpu"
            )
        self.tracer = Tracer(ctx.rank, enabled=cfg.pipeline.trace)
        self.clock = Clock(self.tracer)
        self.data = load_data(cfg.data, cfg.seed)  # every rank: shapes, sizes, labels
        self.per_epoch, self.n_steps = full_batch_steps(cfg, self.data)
        self.dropped = len(self.data.train) - self.per_epoch * cfg.train.batch_size
        self.m = cfg.pipeline.microbatches
        # the first stage keeps the images on its device (before the memory baseline)
        self.train_batches = train_batches(
            cfg, self.data, ctx.device if self.first else None, drop_last=True
        )
        self.memory = MemoryProbe(ctx.device)  # baseline before the model exists
        net = build_net(cfg, self.data)
        check_bp_layout(cfg, self.data, net)
        ranges = partition_blocks(net.n_blocks, cfg.pipeline.stages, cfg.pipeline.partition)
        self.block_range = ranges[ctx.rank]
        stage = StageModule(net, self.block_range)
        del net  # keep only this stage's blocks alive
        self.memory.attach(stage.blocks)
        self.fault = Fault.from_env(ctx.rank)
        self.module = BPStageModule(stage, cfg, ctx.device, self.fault).to(ctx.device)
        params = [p for b in stage.blocks for p in b.parameters()]
        if stage.is_last:
            params += list(stage.heads[-1].parameters())
        self.opt, self.sched = build_optimizer(params, cfg.optim, max(1, self.n_steps))
        self.pstage = CountingStage(self.module, ctx.rank, ctx.world, ctx.device, clock=self.clock)
        schedule_cls = ScheduleGPipe if cfg.pipeline.schedule is Schedule.gpipe else Schedule1F1B
        # Loss /M and no engine scaling: Backprop.step's (loss / m).backward(), exactly.
        self.schedule = schedule_cls(self.pstage, self.m, loss_fn=self._loss, scale_grads=False)
        timeout = timedelta(seconds=cfg.pipeline.timeout_s)
        self.eval_group = dist.new_group(timeout=timeout)  # evaluation traffic: its own channel
        self.metrics = stage_logger(ctx.rank, run_dir, to_dict(cfg), cfg.logger)
        self.history = History()
        self.loss_sum = torch.zeros((), device=ctx.device)
        self.loss_n = 0
        self.train_samples = 0
        self.train_s = 0.0
        self.eval_bytes = 0
        self._steady_step_s = 0.0  # schedule.step time from step 2 on (step 1 infers shapes)
        self._steady_compute_s = 0.0
        self.partition = [[r.start, r.stop] for r in ranges]
        self.ckpt_root = checkpoint.checkpoint_root(cfg, run_dir)
        self.resume_at = (0, 0)  # (epoch, batch index) to start from
        path = checkpoint.resolve_resume(cfg, run_dir)
        if path is not None:
            self.restore(path)

    # ---- checkpoints: every stage reaches step k together (the schedule is lockstep) ----
    def save_checkpoint(self, epoch: int, next_batch: int) -> None:
        extra = {
            "step": self.step, "epoch": epoch, "batch": next_batch, "train_s": self.train_s,
            "train_samples": self.train_samples, "history": self.history.epochs,
            "schedulers": [sched_state(self.sched)],
        }  # fmt: skip
        meta = {"stages": self.ctx.world, "method": self.cfg.method.value,
                "partition": self.partition, "config": to_dict(self.cfg)}  # fmt: skip
        checkpoint.save(
            self.ckpt_root, self.step, self.ctx.rank, self.ctx.world, self.module.stage,
            [self.opt], extra, meta, self.cfg.checkpoint.keep_last, self.ctx.store,
        )  # fmt: skip

    def restore(self, path: Path) -> None:
        meta = checkpoint.verify(path)
        checkpoint.check_compatible(meta, self.cfg, self.partition, path)
        extra = checkpoint.load(path, self.ctx.rank, self.module.stage, [self.opt])
        self.step, self.train_s = extra["step"], extra["train_s"]
        self.train_samples, self.history.epochs = extra["train_samples"], extra["history"]
        restore_schedulers([self.sched], extra["schedulers"])
        self.resume_at = (extra["epoch"], extra["batch"])
        print(f"{self.ctx.tag} resumed from {path} at step {self.step}", flush=True)

    # ---- the engine's loss -------------------------------------------------------------
    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        prev = self.clock.state
        self.clock.enter("loss")
        loss = F.cross_entropy(logits, y) / self.m
        self.clock.enter(prev)
        return loss

    # ---- training ----------------------------------------------------------------------
    def train_step(self, x: Tensor | None, y: Tensor | None) -> None:
        t_start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.module.step = self.step
        t0, c0 = time.perf_counter(), self.clock.total(COMPUTE)
        self.clock.enter("send-wait")
        losses: list[Tensor] = []
        try:
            if self.first:
                assert x is not None
                mbs = [(xm,) for xm in x.tensor_split(self.m)]
                self.schedule.step(arg_mbs=mbs, return_outputs=False)
            elif self.last:
                assert y is not None
                self.schedule.step(
                    target_mbs=list(y.tensor_split(self.m)), losses=losses, return_outputs=False
                )
            else:
                self.schedule.step(return_outputs=False)
        except RuntimeError as e:
            # The engine wraps a forward's exception in "[Stage i] failed to run forward: ...":
            # report the cause itself.
            if "failed to run forward" in str(e) and e.__cause__ is not None:
                raise e.__cause__ from None
            raise
        self.memory.sample()  # gradients of every microbatch are alive now
        if self.step >= 1:
            self._steady_step_s += time.perf_counter() - t0
            self._steady_compute_s += self.clock.total(COMPUTE) - c0
        self.clock.enter("optimizer")
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.clock.enter("send-wait")
        if losses:
            self.loss_sum += torch.stack([loss.detach() for loss in losses]).sum()
            self.loss_n += 1
        self.step += 1
        self.train_samples += self.cfg.train.batch_size
        # one span per batch (the sink's give the benchmarks their steady-state throughput)
        self.tracer.add("train", t_start, time.perf_counter(), n=self.cfg.train.batch_size)

    def log_train(self, epoch: int) -> None:
        """At log intervals: the loss line (last stage), NaN check, peers' failures."""
        if self.last and self.loss_n:
            mean = float(self.loss_sum) / self.loss_n  # the only host sync of the loop
            self.loss_sum.zero_()
            self.loss_n = 0
            if not math.isfinite(mean):
                raise TrainingError(f"step {self.step}: non-finite loss {mean} (epoch {epoch})")
            self.metrics.log(
                {
                    "kind": "train",
                    "stage": self.ctx.rank,
                    "step": self.step,
                    "epoch": epoch,
                    "loss": [mean],
                    "modules": list(self.block_range),
                }
            )
        peer = self.ctx.peer_failure()
        if peer is not None:
            raise PeerFailure(f"stopping: {peer}")

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor | None, Tensor | None]]:
        data, dev, full = self.data, self.ctx.device, self.train_batches
        if self.first:
            for x, _ in full.epoch(epoch, start=start):
                yield x.to(dev, non_blocking=True), None
        elif self.last:
            for _, y in label_batches(full, data).epoch(epoch, start=start):
                yield None, y.to(dev, non_blocking=True)
        else:
            for _ in range(self.per_epoch - start):
                yield None, None

    # ---- evaluation: forward only, through the stages -----------------------------------
    def _send(self, h: Tensor) -> None:
        hdr = torch.zeros(HEADER_LEN, dtype=torch.int64)
        hdr[0], hdr[1], hdr[2] = _EVAL_BATCH, h.dim(), _DTYPES.index(h.dtype)
        hdr[3 : 3 + h.dim()] = torch.tensor(h.shape)
        dst = self.ctx.rank + 1
        dist.send(hdr.to(self.ctx.device), dst, group=self.eval_group)
        h = h.contiguous()
        dist.send(h, dst, group=self.eval_group)
        self.eval_bytes += hdr.numel() * 8 + h.numel() * h.element_size()

    def _send_end(self) -> None:
        hdr = torch.zeros(HEADER_LEN, dtype=torch.int64)
        hdr[0] = _EVAL_END
        dist.send(hdr.to(self.ctx.device), self.ctx.rank + 1, group=self.eval_group)
        self.eval_bytes += hdr.numel() * 8

    def _recv(self) -> Tensor | None:
        src = self.ctx.rank - 1
        hdr = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.ctx.device)
        dist.recv(hdr, src, group=self.eval_group)
        meta = hdr.tolist()
        if meta[0] == _EVAL_END:
            return None
        h = torch.empty(meta[3 : 3 + meta[1]], dtype=_DTYPES[meta[2]], device=self.ctx.device)
        dist.recv(h, src, group=self.eval_group)
        return h

    @torch.no_grad()
    def evaluate(self, name: str, split: Batches) -> float | None:
        """One split through the pipeline; the accuracy on the last stage, None elsewhere."""
        self.module.eval()
        self.module.fault = None  # the fault hook is for training steps
        labels = label_batches(split, self.data).epoch(0) if self.last else None
        inputs = split.epoch(0) if self.first else None
        hits, n = 0, 0
        while True:
            if self.first:
                assert inputs is not None
                self.clock.enter("data")
                x = next(inputs, None)
                h = None if x is None else x[0].to(self.ctx.device)
            else:
                self.clock.enter("recv-wait")
                h = self._recv()
            if h is None:
                if not self.last:
                    self.clock.enter("send-wait")
                    self._send_end()
                break
            self.clock.enter("eval")
            out = self.module(h)
            if self.last:
                assert labels is not None
                _, y = next(labels)
                if y.shape[0] != out.shape[0]:
                    raise TrainingError(f"evaluation of {name}: labels and batches out of step")
                hits += int((out.argmax(-1).cpu() == y).sum())
                n += y.shape[0]
            else:
                self.clock.enter("send-wait")
                self._send(out)
        self.module.fault = self.fault
        self.clock.enter("send-wait")
        return hits / n if self.last and n else None

    def run_eval(self, epoch: int) -> None:
        """Every split through the pipeline; the last stage records and prints the result."""
        splits = eval_splits(self.cfg, self.data)
        record: dict[str, Any] = {
            "kind": "eval",
            "step": self.step,
            "epoch": epoch,
            "train_s": self.train_s,  # training time so far (time to accuracy)
        }
        for name in SPLITS:
            if name in splits:
                acc = self.evaluate(name, splits[name])
                if acc is not None:
                    record[f"{name}_per_depth"] = [acc]
        if self.last:
            self.history.add(record)
            self.metrics.log(record)
            print(
                f"{self.ctx.tag} epoch {epoch} step {self.step}: test accuracy "
                f"{record['test_per_depth'][-1]:.4f}",
                flush=True,
            )

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        every = cfg.train.eval_every_steps
        if self.first and self.dropped:
            print(
                f"{self.ctx.tag} BP pipeline: full batches only, the last {self.dropped} of "
                f"{len(self.data.train)} training samples are left out of every epoch "
                f"({self.per_epoch} steps of {cfg.train.batch_size})",
                flush=True,
            )
        start = time.perf_counter()
        self.clock.enter("send-wait")
        epoch, first_batch = self.resume_at
        ckpt_every = cfg.checkpoint.every_n_steps
        while self.step < self.n_steps:
            self.module.train()
            t0 = time.perf_counter()
            self.clock.enter("data")
            for i, (x, y) in enumerate(self.batches(epoch, first_batch), start=first_batch):
                self.train_step(x, y)
                if ckpt_every and self.step % ckpt_every == 0:
                    self.save_checkpoint(epoch, i + 1)
                if self.step % cfg.train.log_every == 0 or self.step == self.n_steps:
                    self.log_train(epoch)
                if self.step >= self.n_steps:
                    break
                if every and self.step % every == 0:
                    self.train_s += time.perf_counter() - t0  # evaluation time excluded
                    self.run_eval(epoch)
                    self.module.train()
                    t0 = time.perf_counter()
                self.clock.enter("data")
            first_batch = 0
            self.clock.enter("send-wait")
            self.train_s += time.perf_counter() - t0
            if self.loss_n:
                self.log_train(epoch)
            done = self.step >= self.n_steps
            if cfg.train.eval_every_epoch and not done or done and cfg.train.final_eval:
                self.run_eval(epoch)
            epoch += 1
        self.clock.enter("done")
        wall = time.perf_counter() - start
        save_state(self.global_state_dict(), self.run_dir, self.ctx.rank)
        busy = self.clock.total(BUSY)
        steady = self._steady_step_s
        return {
            "stage": self.ctx.rank,
            "modules": list(self.block_range),
            "busy_fraction": busy / wall,
            "recv_wait_fraction": self.clock.total(("recv-wait",)) / wall,
            "send_wait_fraction": self.clock.total(("send-wait",)) / wall,
            "bytes_sent_forward": self.pstage.bytes_forward,
            "bytes_sent_backward": self.pstage.bytes_backward,
            "messages_sent": self.pstage.sends,
            "train_messages": self.step,
            **self.memory.report(),
            "wall_s": wall,
            # BP only: the measured bubble (idle share of schedule.step in steady state, i.e.
            # from the second step on), the textbook (S-1)/(M+S-1), and evaluation traffic.
            "bubble_fraction": 1.0 - self._steady_compute_s / steady if steady > 0 else None,
            "bubble_textbook": (self.ctx.world - 1) / (self.m + self.ctx.world - 1),
            "eval_bytes_sent": self.eval_bytes,
            **handover(self),
        }

    def global_state_dict(self) -> dict[str, Tensor]:
        """This stage's parameters under the whole network's names: blocks.{i}, and the
        final head heads.{L-1} on the last stage (the only head BP trains)."""
        stage = self.module.stage
        out = {}
        for j, block in enumerate(stage.blocks):
            i = self.block_range.start + j
            out.update({f"blocks.{i}.{k}": v for k, v in block.state_dict().items()})
        if stage.is_last:
            i = stage.stop - 1
            out.update({f"heads.{i}.{k}": v for k, v in stage.heads[-1].state_dict().items()})
        return out
