"""The SID stage loop: recv -> forward block+head -> send (h, p, y) -> local backward -> step.

Stage 0 owns the data and is the source of every message; the last stage is the sink and
computes the metrics. Nothing is ever sent to a lower rank. Epoch ends, evaluation passes and
the final stop travel through the pipeline as message kinds, so every stage sees the same
sequence of events in the same order as the sequential trainer.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sidpipe import checkpoint
from sidpipe.config import Config, to_dict
from sidpipe.data import load_data
from sidpipe.logger import stage_logger
from sidpipe.memory import MemoryProbe
from sidpipe.metrics import save_state
from sidpipe.models.heads import uniform_prior
from sidpipe.models.partition import StageModule, partition_blocks
from sidpipe.pipeline.dist import DistContext
from sidpipe.pipeline.report import handover
from sidpipe.pipeline.trace import Tracer
from sidpipe.pipeline.transport import Kind, Message, Transport
from sidpipe.stage import SIDStage
from sidpipe.trainer import (
    History,
    TrainingError,
    build_net,
    eval_splits,
    restore_schedulers,
    sched_state,
    total_steps,
    train_batches,
)

SPLITS = ("test", "val")


class PeerFailure(RuntimeError):
    """Another stage published a failure on the control plane."""


class Fault:
    """Test hook: SIDPIPE_FAULT='stage=1,step=5,kind=raise|nan|kill' injects one fault."""

    def __init__(self, spec: str):
        fields = dict(item.split("=", 1) for item in spec.split(","))
        self.stage, self.step, self.kind = int(fields["stage"]), int(fields["step"]), fields["kind"]

    @classmethod
    def from_env(cls, rank: int) -> Fault | None:
        spec = os.environ.get("SIDPIPE_FAULT")
        fault = cls(spec) if spec else None
        return fault if fault is not None and fault.stage == rank else None

    def apply(self, step: int, h: Tensor) -> Tensor:
        if step != self.step:
            return h
        if self.kind == "raise":
            raise RuntimeError("injected fault (SIDPIPE_FAULT)")
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "nan":
            return h * float("nan")
        raise ValueError(f"SIDPIPE_FAULT kind={self.kind!r} must be raise, nan or kill")


class SIDStageRunner:
    def __init__(self, ctx: DistContext, cfg: Config, run_dir: Path):
        self.ctx, self.cfg, self.run_dir = ctx, cfg, run_dir
        self.first, self.last = ctx.rank == 0, ctx.rank == ctx.world - 1
        host_headers = cfg.pipeline.host_headers
        if host_headers is None:
            host_headers = ctx.backend == "nccl"
        header_group = (  # a collective: every rank creates it, before the memory baseline
            dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.pipeline.timeout_s))
            if host_headers
            else None
        )
        self.data = load_data(
            cfg.data, cfg.seed
        )  # every rank: shapes, sizes; only stage 0 iterates
        if self.first:  # the source keeps the images on its device (before the baseline)
            self.batches = train_batches(cfg, self.data, ctx.device)
            self.splits = eval_splits(cfg, self.data, ctx.device)
        self.memory = MemoryProbe(ctx.device)  # baseline before the model exists
        net = build_net(cfg, self.data)
        ranges = partition_blocks(net.n_blocks, cfg.pipeline.stages, cfg.pipeline.partition)
        self.block_range = ranges[ctx.rank]
        self.n_depths = net.n_blocks
        updates = max(1, total_steps(cfg, self.data) // cfg.sid.accumulate_steps)
        self.stage = SIDStage(
            StageModule(net, self.block_range), cfg, updates, ctx.device, self.memory
        )
        del net  # keep only this stage's blocks alive
        self.tracer = Tracer(ctx.rank, enabled=cfg.pipeline.trace)
        self.transport = Transport(
            ctx.rank, ctx.world, ctx.device, cfg.pipeline.queue_depth, ctx.staged,
            cfg.pipeline.reuse_buffers, self.tracer, header_group,
        )  # fmt: skip
        self.fault = Fault.from_env(ctx.rank)
        self.metrics = stage_logger(ctx.rank, run_dir, to_dict(cfg), cfg.logger)
        self.history = History()
        self.step = 0  # training messages processed by this stage
        self.busy_s = 0.0
        self.train_busy_s = 0.0  # forward + update of training messages (no send, no eval)
        self.loss_sum = torch.zeros(self.stage.n_modules, device=ctx.device)
        self.loss_n = 0
        self.hits = {s: torch.zeros(self.stage.n_modules, dtype=torch.int64) for s in SPLITS}
        self.counts = dict.fromkeys(SPLITS, 0)
        self.train_samples = 0
        self.train_s = 0.0
        self._train_t0: float | None = None
        self._eval_record: dict[str, Any] = {}
        self.expected_splits = [s for s in SPLITS if s == "test" or self.data.val is not None]
        self.partition = [[r.start, r.stop] for r in ranges]
        self.ckpt_root = checkpoint.checkpoint_root(cfg, run_dir)
        self.resume_at = (0, 0)  # (epoch, batch index) stage 0 starts from
        path = checkpoint.resolve_resume(cfg, run_dir)
        if path is not None:
            self.restore(path)

    # ---- the source: stage 0 turns the data into messages ---------------------------
    def source(self) -> Iterator[Message]:
        cfg, data = self.cfg, self.data
        n_steps = total_steps(cfg, data)
        batches, splits = self.batches, self.splits
        every = cfg.train.eval_every_steps
        k = data.num_classes

        def evaluation(step: int, epoch: int) -> Iterator[Message]:
            for split_id, name in enumerate(SPLITS):
                if name in splits:
                    for x, y in splits[name].epoch(0):
                        prior = uniform_prior(x.shape[0], k, x.device)
                        yield Message(Kind.EVAL, step, epoch, x, prior, y, split=split_id)
                    table = torch.zeros(0, 2, dtype=torch.int64)  # per-depth [hits, count]
                    yield Message(Kind.EVAL_END, step, epoch, table, split=split_id)

        ckpt_every = cfg.checkpoint.every_n_steps
        step = self.step
        epoch, start = self.resume_at
        while step < n_steps:
            for i, (x, y) in enumerate(batches.epoch(epoch, start=start), start=start):
                yield Message(Kind.TRAIN, step, epoch, x, uniform_prior(x.shape[0], k, x.device), y)
                step += 1
                if ckpt_every and step % ckpt_every == 0:
                    # split = the next batch's index in this epoch: where a resume starts
                    yield Message(Kind.CHECKPOINT, step, epoch, split=i + 1)
                if step >= n_steps:
                    break
                if every and step % every == 0:
                    yield from evaluation(step, epoch)
            start = 0
            done = step >= n_steps
            if cfg.train.eval_every_epoch and not done or done and cfg.train.final_eval:
                yield from evaluation(step, epoch)
            yield Message(Kind.EPOCH_END, step, epoch)
            epoch += 1
        yield Message(Kind.STOP, step, epoch)

    def messages(self) -> Iterator[Message]:
        if self.first:
            for msg in self.source():
                if msg.h is not None and msg.kind in (Kind.TRAIN, Kind.EVAL):
                    msg.h, msg.p, msg.y = (t.to(self.ctx.device) for t in (msg.h, msg.p, msg.y))
                yield msg
        else:
            while True:
                msg = self.transport.recv()  # traces "recv-wait" and "recv" itself
                yield msg
                if msg.kind is Kind.STOP:
                    return

    def send(self, msg: Message) -> None:
        if not self.last:
            with self.tracer.span("send"):
                self.transport.send(msg)

    # ---- per message kind -------------------------------------------------------------
    def on_train(self, msg: Message) -> None:
        assert msg.h is not None and msg.p is not None and msg.y is not None
        if self._train_t0 is None:
            self._train_t0 = time.perf_counter()
        t0 = time.perf_counter()
        h = self.fault.apply(self.step, msg.h) if self.fault else msg.h
        with self.tracer.span("forward"):
            h_out, p_out, losses, _ = self.stage.forward(h, msg.p, msg.y)
        t1 = time.perf_counter()
        # Send first: the next stage starts while this one runs its backward and step.
        self.send(Message(Kind.TRAIN, msg.step, msg.epoch, h_out, p_out, msg.y))
        t2 = time.perf_counter()
        with self.tracer.span("backward+step"):
            self.stage.update(losses)
        with torch.no_grad():
            self.loss_sum += torch.stack([loss.detach().float() for loss in losses])
        self.loss_n += 1
        self.step += 1
        self.train_samples += msg.y.shape[0]
        t3 = time.perf_counter()
        self.busy_s += (t1 - t0) + (t3 - t2)
        self.train_busy_s += (t1 - t0) + (t3 - t2)
        self.tracer.add("train", t0, t3, n=int(msg.y.shape[0]))  # one per message: throughput
        if self.step % self.cfg.train.log_every == 0:
            self.log_train(msg.epoch)

    def log_train(self, epoch: int) -> None:
        """The only host sync of the loop, every train.log_every messages."""
        mean = (self.loss_sum / max(1, self.loss_n)).tolist()
        self.loss_sum.zero_()
        self.loss_n = 0
        bad = [v for v in mean if not math.isfinite(v)]
        if bad:
            raise TrainingError(
                f"step {self.step}: non-finite local loss {bad[0]} "
                f"(modules {list(self.block_range)})"
            )
        self.metrics.log(
            {
                "kind": "train",
                "stage": self.ctx.rank,
                "step": self.step,
                "epoch": epoch,
                "loss": mean,
                "modules": list(self.block_range),
            }
        )
        peer = self.ctx.peer_failure()
        if peer is not None:
            raise PeerFailure(f"stopping: {peer}")

    def pause_train_clock(self) -> None:
        """Training time excludes evaluation: throughput and time-to-accuracy use it."""
        if self._train_t0 is not None:
            self.train_s += time.perf_counter() - self._train_t0
            self._train_t0 = None

    def on_eval(self, msg: Message) -> None:
        assert msg.h is not None and msg.p is not None and msg.y is not None
        self.pause_train_clock()
        t0 = time.perf_counter()
        with self.tracer.span("eval"):
            h_out, p_out, logits = self.stage.eval_forward(msg.h, msg.p)
        split = SPLITS[msg.split]
        self.hits[split] += torch.stack([(z.argmax(-1) == msg.y).sum() for z in logits]).cpu()
        self.counts[split] += msg.y.shape[0]
        self.busy_s += time.perf_counter() - t0
        self.send(Message(Kind.EVAL, msg.step, msg.epoch, h_out, p_out, msg.y, split=msg.split))

    def on_eval_end(self, msg: Message) -> None:
        """Append this stage's [hits, count] rows to the per-depth table travelling downstream."""
        split = SPLITS[msg.split]
        assert msg.h is not None
        rows = torch.stack(
            [self.hits[split], torch.full_like(self.hits[split], self.counts[split])], 1
        )
        table = torch.cat([msg.h.cpu(), rows])
        self.hits[split].zero_()
        self.counts[split] = 0
        if not self.last:
            table = table.to(self.transport.comm_device)
            self.send(Message(Kind.EVAL_END, msg.step, msg.epoch, table, split=msg.split))
            return
        assert table.shape[0] == self.n_depths, "per-depth table lost a stage"
        self._eval_record[f"{split}_per_depth"] = (table[:, 0].double() / table[:, 1]).tolist()
        if all(f"{s}_per_depth" in self._eval_record for s in self.expected_splits):
            record = {
                "kind": "eval",
                "step": msg.step,
                "epoch": msg.epoch,
                "train_s": self.train_s,
                **self._eval_record,
            }
            self.history.add(record)
            self.metrics.log(record)
            print(
                f"{self.ctx.tag} epoch {msg.epoch} step {msg.step}: test accuracy "
                f"{record['test_per_depth'][-1]:.4f}",
                flush=True,
            )
            self._eval_record = {}

    def on_checkpoint(self, msg: Message) -> None:
        """Every stage saves its state after the same training step: a consistent cut."""
        self.pause_train_clock()
        self.send(msg)  # downstream saves while this stage does
        extra = {
            "step": self.step, "epoch": msg.epoch, "batch": msg.split,
            "messages": self.stage.messages, "train_s": self.train_s,
            "train_samples": self.train_samples, "history": self.history.epochs,
            "schedulers": [sched_state(s) for s in self.stage.schedulers],
        }  # fmt: skip
        meta = {"stages": self.ctx.world, "method": self.cfg.method.value,
                "partition": self.partition, "config": to_dict(self.cfg)}  # fmt: skip
        with self.tracer.span("checkpoint"):
            checkpoint.save(
                self.ckpt_root, msg.step, self.ctx.rank, self.ctx.world, self.stage.stage,
                self.stage.optimizers, extra, meta, self.cfg.checkpoint.keep_last, self.ctx.store,
            )  # fmt: skip

    def restore(self, path: Path) -> None:
        meta = checkpoint.verify(path)
        checkpoint.check_compatible(meta, self.cfg, self.partition, path)
        extra = checkpoint.load(path, self.ctx.rank, self.stage.stage, self.stage.optimizers)
        self.step, self.stage.messages = extra["step"], extra["messages"]
        self.train_s, self.train_samples = extra["train_s"], extra["train_samples"]
        self.history.epochs = extra["history"]
        restore_schedulers(self.stage.schedulers, extra["schedulers"])
        self.resume_at = (extra["epoch"], extra["batch"])
        print(f"{self.ctx.tag} resumed from {path} at step {self.step}", flush=True)

    def on_epoch_end(self, msg: Message) -> None:
        self.pause_train_clock()
        if self.loss_n:
            self.log_train(msg.epoch)
        self.send(Message(Kind.EPOCH_END, msg.step, msg.epoch))

    # ---- the loop ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        handlers = {
            Kind.TRAIN: self.on_train,
            Kind.EVAL: self.on_eval,
            Kind.EVAL_END: self.on_eval_end,
            Kind.EPOCH_END: self.on_epoch_end,
            Kind.CHECKPOINT: self.on_checkpoint,
        }
        start = time.perf_counter()
        for msg in self.messages():
            if msg.kind is Kind.STOP:
                self.send(msg)
                break
            handlers[msg.kind](msg)
        self.transport.flush()
        wall = time.perf_counter() - start
        save_state(self.global_state_dict(), self.run_dir, self.ctx.rank)
        st = self.transport.stats
        return {
            "stage": self.ctx.rank,
            "modules": list(self.block_range),
            "busy_fraction": self.busy_s / wall,
            # per training message, forward + update: what partition=auto predicts
            "train_step_ms": 1e3 * self.train_busy_s / max(1, self.step),
            "recv_wait_fraction": st.recv_wait_s / wall,
            "recv_fraction": st.recv_s / wall,
            "send_wait_fraction": st.send_wait_s / wall,
            "bytes_sent_forward": st.bytes_forward,
            "bytes_sent_backward": st.bytes_backward,
            "messages_sent": st.messages_sent,
            "train_messages": self.step,
            **self.memory.report(),
            "wall_s": wall,
            **handover(self),
        }

    def global_state_dict(self) -> dict[str, Tensor]:
        """This stage's parameters under the whole network's names (blocks.{i}, heads.{i})."""
        out = {}
        for j, (block, head) in enumerate(zip(self.stage.stage.blocks, self.stage.stage.heads)):
            i = self.block_range.start + j
            out.update({f"blocks.{i}.{k}": v for k, v in block.state_dict().items()})
            out.update({f"heads.{i}.{k}": v for k, v in head.state_dict().items()})
        return out
