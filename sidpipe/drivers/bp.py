"""The backprop baseline pipeline: every schedule `torch.distributed.pipelining` ships.

One process per rank, each hosting one `PipelineStage` (gpipe, 1f1b) or several
(`pipeline.stages_per_rank`: looped placement for interleaved_1f1b, looped_bfs and
interleaved_zb, V-shaped for zbv and dualpipev) over contiguous blocks (`partition_blocks`
over pipeline.stages * stages_per_rank stages); the last stage also runs the final head
(fed the uniform prior) and the loss. The engine decides the order of forwards, backwards
and p2p ops; this module only feeds it, steps the optimizer once per batch, evaluates, and measures.

Choices (measured in docs/benchmarks.md):
- Full batches only: the schedules need every microbatch to have the shape of the first, so the
  last partial batch of an epoch is dropped (`Batches(drop_last=True)`). With a training set
  that is a multiple of `train.batch_size`, or `train.max_steps` inside the first epoch, this is
  step for step the single-process `Backprop` trainer with gradient accumulation.
- Loss = cross_entropy / M per microbatch with `scale_grads=False`: the same gradient, computed
  in the same order, as `Backprop.step`'s `(loss / m).backward()`.
- The rank holding stage 0 feeds the inputs; the rank holding the last stage (rank S-1, or
  rank 0 in a V) feeds the targets from its own copy of the data order (labels only), so no
  label traffic crosses the pipeline.
- Evaluation: forward only through the stages, as EVAL / EVAL_END messages of the SID
  runner's own codec (runtime/transport.py) on a separate process group; the last stage
  counts the hits.
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
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)

from sidpipe.config import Config, Schedule
from sidpipe.data import Batches, DataBundle, TextBatches, TextSplit, eval_splits, train_batches
from sidpipe.drivers.runner import SPLITS, Fault, LossMeter, RankRunner, global_state_dict
from sidpipe.errors import TrainingError
from sidpipe.method.learner import autocast, build_optimizer
from sidpipe.method.loss import at_least_fp32
from sidpipe.method.step import LN2, depth_scores
from sidpipe.models.partition import Stage
from sidpipe.runtime.cadence import (
    Event,
    EventKind,
    cadence,
    preemptible,
    run_cadence,
    steps_per_epoch,
    total_steps,
)
from sidpipe.runtime.dist import DistContext
from sidpipe.runtime.io import save_state
from sidpipe.runtime.trace import Span, Tracer
from sidpipe.runtime.transport import Kind, Message, Transport

SCHEDULES = {
    Schedule.gpipe: ScheduleGPipe,
    Schedule.onef1b: Schedule1F1B,
    Schedule.interleaved_1f1b: ScheduleInterleaved1F1B,
    Schedule.looped_bfs: ScheduleLoopedBFS,
    Schedule.interleaved_zb: ScheduleInterleavedZeroBubble,
    Schedule.zbv: ScheduleZBVZeroBubble,
    Schedule.dualpipev: ScheduleDualPipeV,
}


def stage_ids(schedule: Schedule, rank: int, world: int, per_rank: int) -> list[int]:
    """The pipeline stages rank `rank` holds, ascending: looped (r, r+S, r+2S, ...) or, for
    the V schedules, r and 2S-1-r (so rank 0 holds the first and the last stage)."""
    if schedule.v_shape:
        return sorted([rank, 2 * world - 1 - rank])
    return [rank + k * world for k in range(per_rank)]


# Busy as in the SID runner: compute, not data preparation; "data" is neither busy nor waiting.
BUSY = (Span.FORWARD, Span.BACKWARD, Span.LOSS, Span.OPTIMIZER, Span.EVAL)
COMPUTE = (Span.FORWARD, Span.BACKWARD, Span.LOSS)  # what the schedule itself computes


def check_bp_layout(cfg: Config, data: DataBundle, net: nn.Module) -> None:
    """What a BP pipeline needs beyond the SID checks; raised before any process starts
    (launch.check_layout) and again on every rank (torchrun skips the launcher's check)."""
    if not hasattr(net, "blocks"):
        raise TrainingError(
            "sid.variant=shared builds the reference repo's shared-extractor network, which has "
            "no blocks to cut into stages: use sid.variant=blockwise for a BP pipeline"
        )
    if steps_per_epoch(cfg, data, drop_last=True) == 0:
        raise TrainingError(
            f"the training split has {len(data.train)} samples, fewer than "
            f"train.batch_size={cfg.train.batch_size}: a BP pipeline trains full batches only"
        )


def label_batches(split_batches: Batches | TextBatches, data: DataBundle) -> Batches | TextBatches:
    """The same batches (order, sizes) as `split_batches`, cheap: images cut to one pixel.

    The sample order depends only on (seed, epoch), so the labels match the full batches the
    first stage iterates exactly; augmentation touches only the images. Text windows are
    cheap as they are: the same iterator, on the host.
    """
    if isinstance(split_batches, TextBatches):
        return TextBatches(split_batches.split, split_batches.batch_size, split_batches.shuffle,
                           split_batches.seed, split_batches.drop_last)  # fmt: skip
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
        self.totals: dict[Span, float] = {}
        self.state = Span.SETUP
        self.t = time.perf_counter()

    def enter(self, state: Span) -> None:
        now = time.perf_counter()
        if state == self.state:
            return
        d = now - self.t
        self.totals[self.state] = self.totals.get(self.state, 0.0) + d
        if d > 0 and self.state not in (Span.SETUP, Span.DONE):
            self.tracer.add(self.state, self.t, now)
        self.state, self.t = state, now

    def total(self, states: tuple[Span, ...]) -> float:
        """Time spent in `states` so far, the current state included up to now."""
        out = sum(self.totals.get(s, 0.0) for s in states)
        if self.state in states:
            out += time.perf_counter() - self.t
        return out


class EngineModule(nn.Module):
    """What the engine runs on one stage: the blocks (and on the last stage the final head)."""

    def __init__(self, stage: Stage, cfg: Config, device: torch.device, fault: Fault | None):
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
            self.clock.enter(Span.RECV_WAIT)
        return ops

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_bwd_recv_ops(bwd_chunk_id)
        if ops:
            self.clock.enter(Span.RECV_WAIT)
        return ops

    def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        self.clock.enter(Span.FORWARD)
        try:
            return super().forward_one_chunk(*args, **kwargs)
        finally:
            self.clock.enter(Span.SEND_WAIT)

    def backward_one_chunk(self, *args: Any, **kwargs: Any) -> None:
        self.clock.enter(Span.BACKWARD)
        try:
            return super().backward_one_chunk(*args, **kwargs)
        finally:
            self.clock.enter(Span.SEND_WAIT)

    def backward_weight_one_chunk(self, *args: Any, **kwargs: Any) -> None:
        """Zero-bubble schedules: the weight-gradient half of a backward."""
        self.clock.enter(Span.BACKWARD)
        try:
            return super().backward_weight_one_chunk(*args, **kwargs)
        finally:
            self.clock.enter(Span.SEND_WAIT)


class BPRunner(RankRunner):
    def __init__(self, ctx: DistContext, cfg: Config, run_dir: Path):
        super().__init__(ctx, cfg, run_dir)
        if ctx.staged:
            raise TrainingError(
                "method=bp pipelines send device tensors through torch.distributed.pipelining, "
                "which gloo cannot do for CUDA tensors: use pipeline.transport=nccl (or auto), "
                "or device=cpu"
            )
        pipe = cfg.pipeline
        self.clock = Clock(self.tracer)
        self.per_epoch = steps_per_epoch(cfg, self.data, drop_last=True)
        self.n_steps = total_steps(cfg, self.data, drop_last=True)
        self.dropped = len(self.data.train) - self.per_epoch * cfg.train.batch_size
        self.m = pipe.microbatches
        self.n_stages = cfg.stage_count
        mine = stage_ids(pipe.schedule, ctx.rank, ctx.world, pipe.stages_per_rank or 1)
        self.first, self.last = 0 in mine, self.n_stages - 1 in mine
        # the first stage keeps the images on its device (before the memory baseline)
        self.train_batches = train_batches(
            cfg, self.data, ctx.device if self.first else None, drop_last=True
        )
        stages = self.build_stages(mine, check=lambda net: check_bp_layout(cfg, self.data, net))
        for stage in stages:
            self.memory.attach(stage.blocks)
        self.modules = [EngineModule(st, cfg, ctx.device, self.fault).to(ctx.device)
                        for st in stages]  # fmt: skip
        self.local = nn.ModuleList(stages)  # what checkpoints save
        params = [p for st in stages for b in st.blocks for p in b.parameters()]
        if self.last:
            params += list(stages[-1].heads[-1].parameters())
        self.opt, self.sched = build_optimizer(params, cfg.optim, max(1, self.n_steps))
        self.pstages = [
            CountingStage(module, i, self.n_stages, ctx.device, clock=self.clock)
            for i, module in zip(mine, self.modules)
        ]
        # Loss /M and no engine scaling: Backprop.step's (loss / m).backward(), exactly.
        schedule_cls = SCHEDULES[pipe.schedule]
        engine_stages = self.pstages if pipe.schedule.multi_stage else self.pstages[0]
        self.schedule = schedule_cls(engine_stages, self.m, loss_fn=self._loss, scale_grads=False)
        timeout = timedelta(seconds=pipe.timeout_s)
        # Evaluation traffic: its own channel, the SID runner's message codec.
        self.eval_transport = Transport(
            ctx.rank, ctx.world, ctx.device, pipe.queue_depth, staged=False,
            reuse_buffers=False, group=dist.new_group(timeout=timeout), prefetch=False,
        )  # fmt: skip
        self.losses = LossMeter(1, ctx.device)
        self._steady_step_s = 0.0  # schedule.step time from step 2 on (step 1 infers shapes)
        self._steady_compute_s = 0.0
        self.resume(self.local, [self.opt], [self.sched])

    def owner(self, stage: int) -> int:
        """The rank that holds pipeline stage `stage`."""
        world = self.ctx.world
        if self.cfg.pipeline.schedule.v_shape:
            return stage if stage < world else 2 * world - 1 - stage
        return stage % world

    # ---- the engine's loss -------------------------------------------------------------
    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        prev = self.clock.state
        self.clock.enter(Span.LOSS)
        # (B, T, V) logits of a language model: every position is a prediction
        loss = F.cross_entropy(logits.flatten(0, -2), y.flatten()) / self.m
        self.clock.enter(prev)
        return loss

    # ---- training ----------------------------------------------------------------------
    def train_step(self, x: Tensor | None, y: Tensor | None) -> None:
        t_start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        for module in self.modules:
            module.step = self.state.step
        t0, c0 = time.perf_counter(), self.clock.total(COMPUTE)
        self.clock.enter(Span.SEND_WAIT)
        losses: list[Tensor] = []
        kwargs: dict[str, Any] = {}
        if self.first:  # a V's rank 0 feeds both the inputs and the targets
            assert x is not None
            kwargs["arg_mbs"] = [(xm,) for xm in x.tensor_split(self.m)]
        if self.last:
            assert y is not None
            kwargs.update(target_mbs=list(y.tensor_split(self.m)), losses=losses)
        try:
            self.schedule.step(return_outputs=False, **kwargs)
        except RuntimeError as e:
            # The engine wraps a forward's exception in "[Stage i] failed to run forward: ...":
            # report the cause itself.
            if "failed to run forward" in str(e) and e.__cause__ is not None:
                raise e.__cause__ from None
            raise
        self.memory.sample()  # gradients of every microbatch are alive now
        if self.state.step >= 1:
            self._steady_step_s += time.perf_counter() - t0
            self._steady_compute_s += self.clock.total(COMPUTE) - c0
        self.clock.enter(Span.OPTIMIZER)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.clock.enter(Span.SEND_WAIT)
        if losses:
            self.losses.add([torch.stack([loss.detach() for loss in losses]).sum()])
        self.state.step += 1
        self.state.samples += self.cfg.train.batch_size
        # one span per batch (the sink's give the benchmarks their steady-state throughput)
        self.tracer.add(Span.TRAIN, t_start, time.perf_counter(), n=self.cfg.train.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor | None, Tensor | None]]:
        """What this rank feeds the schedule: images on the first, labels on the last."""
        self.clock.enter(Span.DATA)
        data, dev, full = self.data, self.ctx.device, self.train_batches
        if self.first:
            batches = ((x.to(dev, non_blocking=True), y.to(dev, non_blocking=True) if self.last
                        else None) for x, y in full.epoch(epoch, start))  # fmt: skip
        elif self.last:
            labels = label_batches(full, data).epoch(epoch, start=start)
            batches = ((None, y.to(dev, non_blocking=True)) for _, y in labels)
        else:
            batches = ((None, None) for _ in range(self.per_epoch - start))
        for batch in batches:
            yield batch
            self.clock.enter(Span.DATA)
        self.clock.enter(Span.SEND_WAIT)

    # ---- evaluation: forward only, through the stages -----------------------------------
    @torch.no_grad()
    def evaluate(self, name: str, split: Batches | TextBatches) -> tuple[float, float] | None:
        """One split through the stages in order, batch by batch (forward only); (accuracy,
        bits per prediction) on the rank holding the last stage, None elsewhere."""
        for module in self.modules:
            module.eval()
            module.fault = None  # the fault hook is for training steps
        labels = label_batches(split, self.data).epoch(0) if self.last else None
        inputs = split.epoch(0) if self.first else None
        rank, transport = self.ctx.rank, self.eval_transport
        total = torch.zeros(1, 3, dtype=torch.float64)
        for _ in range(len(split)):
            h: Tensor | None = None
            for stage, module in zip(self.stage_ids, self.modules):
                if stage == 0:
                    assert inputs is not None
                    self.clock.enter(Span.DATA)
                    h = next(inputs)[0].to(self.ctx.device)
                elif self.owner(stage - 1) != rank:
                    self.clock.enter(Span.RECV_WAIT)
                    h = transport.recv(src=self.owner(stage - 1)).h
                self.clock.enter(Span.EVAL)
                h = module(h)  # the previous local stage's output feeds the next local one
                if stage == self.n_stages - 1:
                    assert labels is not None
                    _, y = next(labels)
                    if y.shape[0] != h.shape[0]:
                        raise TrainingError(f"evaluation of {name}: labels and batches out of step")
                    total += depth_scores([h.cpu()], y)  # [hits, count, nll]
                elif self.owner(stage + 1) != rank:
                    self.clock.enter(Span.SEND_WAIT)
                    transport.send(Message(Kind.EVAL, h=h), dst=self.owner(stage + 1))
        self.clock.enter(Span.SEND_WAIT)
        transport.flush()
        for module in self.modules:
            module.fault = self.fault
            module.train()
        hits, n, nll = total[0].tolist()
        # bits per byte for a text (nats over the bytes the targets stand for), else per
        # prediction: rows with different tokenizers compare
        units = getattr(split, "scored_bytes", n)
        return (hits / n, nll / units / LN2) if self.last and n else None

    def run_eval(self, step: int, epoch: int) -> None:
        """Every split through the pipeline; the last stage records and prints the result."""
        splits = eval_splits(self.cfg, self.data)
        record: dict[str, Any] = {"kind": "eval", "step": step, "epoch": epoch,
                                  "train_s": self.state.train_s}  # fmt: skip
        for name in SPLITS:
            if name in splits:
                scores = self.evaluate(name, splits[name])
                if scores is not None:
                    record[f"{name}_per_depth"] = [scores[0]]
                    if isinstance(self.data.test, TextSplit):
                        record[f"{name}_bpb_per_depth"] = [scores[1]]
        if self.last:
            self.state.history.add(record)
            self.metrics.log(record)
            self.print_eval(record)

    # ---- per cadence event ------------------------------------------------------------
    def on_train(self, ev: Event) -> None:
        self.train_step(ev.x, ev.y)
        if self.state.step % self.cfg.train.log_every == 0:
            self.log_train(self.losses, ev.epoch)

    def on_epoch_end(self, ev: Event) -> None:
        if self.losses.count:
            self.log_train(self.losses, ev.epoch)

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        if self.first and self.dropped:
            print(
                f"{self.ctx.tag} BP pipeline: full batches only, the last {self.dropped} of "
                f"{len(self.data.train)} training samples are left out of every epoch "
                f"({self.per_epoch} steps of {cfg.train.batch_size})",
                flush=True,
            )
        start = time.perf_counter()
        for module in self.modules:
            module.train()
        events = cadence(cfg.train, cfg.checkpoint.every_n_steps, self.n_steps, state.position,
                         self.batches)  # fmt: skip
        # a preemption: every rank stops after the same agreed step, with a checkpoint there
        self.preemption.poll_s = 0.0  # asked at every step: see Preemption.agreed
        on = {
            EventKind.TRAIN: self.on_train,
            # every stage reaches step k together: the schedule is lockstep
            EventKind.CHECKPOINT: lambda ev: self.checkpoints.save(
                state, self.local, [self.opt], [self.sched]
            ),
            EventKind.EVAL: lambda ev: self.run_eval(ev.step, ev.epoch),
            EventKind.EPOCH_END: self.on_epoch_end,
        }
        last = run_cadence(preemptible(events, self.preemption.agreed, state.step), on, state)
        self.preempted = last.kind is EventKind.PREEMPT
        self.clock.enter(Span.DONE)
        wall = time.perf_counter() - start
        if not self.preempted:  # a preempted run's parameters are in its checkpoint
            save_state(self.global_state_dict(), self.run_dir, self.ctx.rank)
        steady = self._steady_step_s
        return self.result(
            wall, self.clock.total(BUSY),
            recv_wait_fraction=self.clock.total((Span.RECV_WAIT,)) / wall,
            send_wait_fraction=self.clock.total((Span.SEND_WAIT,)) / wall,
            pipeline_stages=self.stage_ids,  # the pipeline stages this rank holds
            bytes_sent_forward=sum(st.bytes_forward for st in self.pstages),
            bytes_sent_backward=sum(st.bytes_backward for st in self.pstages),
            messages_sent=sum(st.sends for st in self.pstages),
            # BP only: the measured bubble (idle share of schedule.step in steady state, i.e.
            # from the second step on), the textbook (S-1)/(M+S-1), and evaluation traffic.
            bubble_fraction=1.0 - self._steady_compute_s / steady if steady > 0 else None,
            bubble_textbook=(self.ctx.world - 1) / (self.m + self.ctx.world - 1),
            eval_bytes_sent=self.eval_transport.stats.bytes_forward
            + self.eval_transport.stats.bytes_backward,
        )  # fmt: skip

    def global_state_dict(self) -> dict[str, Tensor]:
        """This rank's blocks under the whole network's names, and with the last stage the
        final head heads.{L-1} (the only head BP trains)."""
        out: dict[str, Tensor] = {}
        for stage in self.local:
            heads = {stage.stop - 1: stage.heads[-1]} if stage.is_last else {}
            out.update(global_state_dict(stage.blocks, heads, stage.first))
        return out
