"""The SID stage loop: recv -> forward block+head -> send (h, p, y) -> local backward -> step.

Stage 0 owns the data and is the source of every message: it turns the run cadence
(runtime/cadence.py) into messages. The last stage is the sink and computes the metrics.
Nothing is ever sent to a lower rank. Epoch ends, evaluation passes, checkpoints and the
final stop travel through the pipeline as message kinds, so every stage sees the same
sequence of events in the same order as the sequential trainer (docs/design.md §2-4).
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sidpipe.config import Config, Precision
from sidpipe.data import TextSplit, eval_splits, train_batches
from sidpipe.drivers.runner import SPLITS, LossMeter, RankRunner, global_state_dict
from sidpipe.errors import ConfigError
from sidpipe.method.learner import SIDLearner
from sidpipe.method.step import LN2, depth_scores
from sidpipe.runtime.cadence import Event, EventKind, cadence, preemptible, run_cadence, total_steps
from sidpipe.runtime.dist import DistContext
from sidpipe.runtime.io import save_state
from sidpipe.runtime.trace import Span
from sidpipe.runtime.transport import Kind, LoopbackTransport, Message, Transport
from sidpipe.runtime.wire import from_wire, to_wire


class SIDRunner(RankRunner):
    """transport: how messages move (default: torch.distributed p2p, `Transport`); the fast
    tests pass a `LoopbackTransport` and run every stage as a thread of one process."""

    def __init__(
        self,
        ctx: DistContext,
        cfg: Config,
        run_dir: Path,
        transport: Transport | LoopbackTransport | None = None,
    ):
        super().__init__(ctx, cfg, run_dir)
        host_headers = cfg.pipeline.host_headers
        if host_headers is None:
            host_headers = ctx.backend == "nccl"
        host_headers = host_headers and transport is None
        header_group = (  # a collective: every rank creates it, before the memory baseline
            dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.pipeline.timeout_s))
            if host_headers
            else None
        )
        if self.first:  # the source keeps the images on its device (before the baseline)
            self.batches = train_batches(cfg, self.data, ctx.device)
            self.splits = eval_splits(cfg, self.data, ctx.device)
        self.n_steps = total_steps(cfg, self.data)
        (module,) = self.build_stages([ctx.rank])
        updates = max(1, self.n_steps // cfg.sid.accumulate_steps)
        self.learner = SIDLearner(module, cfg, updates, ctx.device, self.memory)
        self.transport = transport or Transport(
            ctx.rank, ctx.world, ctx.device, cfg.pipeline.queue_depth, ctx.staged,
            cfg.pipeline.reuse_buffers, self.tracer, header_group,
        )  # fmt: skip
        self.busy_s = 0.0
        self.train_busy_s = 0.0  # forward + update of training messages (no send, no eval)
        self.losses = LossMeter(self.learner.n_modules, ctx.device)
        self.lm = module.per_position  # a language model: beliefs per position, bits per byte
        self.bf16_wire = cfg.pipeline.belief_dtype is Precision.bf16
        self.topk = module.belief_topk  # checked against the classes by build_net
        if self.bf16_wire and self.data.num_classes % 2:
            raise ConfigError(
                f"pipeline.belief_dtype=bf16 needs an even number of classes (beliefs travel "
                f"as pairs of bf16 in fp32 words); this data has {self.data.num_classes}"
            )
        self.hits = {s: torch.zeros(self.learner.n_modules, dtype=torch.int64) for s in SPLITS}
        # language models: per depth [hits, count, nll in nats], float64
        self.scores = {s: torch.zeros(self.learner.n_modules, 3, dtype=torch.float64)
                       for s in SPLITS}  # fmt: skip
        self.counts = dict.fromkeys(SPLITS, 0)
        self._eval_record: dict[str, Any] = {}
        self.expected_splits = [s for s in SPLITS if s == "test" or self.data.val is not None]
        self.resume(self.learner.stage, self.learner.optimizers, self.learner.schedulers)
        self.learner.messages = self.state.messages

    # ---- the source: stage 0 turns the cadence into messages --------------------------
    def run_source(self) -> Message:
        """Stage 0: the cadence's events, as messages, through this stage's own handlers;
        returns the STOP to send on. A preemption is a CHECKPOINT (the same consistent cut
        as a periodic one), then a STOP whose split slot says "preempted" (1): every stage
        saves, passes it on and stops."""
        dev, prior = self.ctx.device, self.learner.stage.prior
        events = cadence(self.cfg.train, self.cfg.checkpoint.every_n_steps, self.n_steps,
                         self.state.position, self.batches.epoch)  # fmt: skip

        def train(ev: Event) -> None:
            x, y = ev.x.to(dev), ev.y.to(dev)
            # a TRAIN message's step is the batch's index (steps done before it)
            self.on_train(Message(Kind.TRAIN, ev.step - 1, ev.epoch, x, prior(x).float(), y))

        def evaluate(ev: Event) -> None:
            for split_id, name in enumerate(SPLITS):
                if name in self.splits:
                    for x, y in self.splits[name].epoch(0):
                        x, y = x.to(dev), y.to(dev)
                        self.on_eval(Message(Kind.EVAL, ev.step, ev.epoch, x, prior(x).float(),
                                             y, split=split_id))  # fmt: skip
                    # per-depth [hits, count] (language models: + nll, float64)
                    table = (torch.zeros(0, 3, dtype=torch.float64) if self.lm
                             else torch.zeros(0, 2, dtype=torch.int64))  # fmt: skip
                    self.on_eval_end(Message(Kind.EVAL_END, ev.step, ev.epoch, table,
                                             split=split_id))  # fmt: skip

        on = {
            EventKind.TRAIN: train,
            # split = the next batch's index in this epoch: where a resume starts
            EventKind.CHECKPOINT: lambda ev: self.on_checkpoint(
                Message(Kind.CHECKPOINT, ev.step, ev.epoch, split=ev.batch)
            ),
            EventKind.EVAL: evaluate,
            EventKind.EPOCH_END: lambda ev: self.on_epoch_end(
                Message(Kind.EPOCH_END, ev.step, ev.epoch)
            ),
        }
        stop_after = lambda _: self.preemption.requested()  # noqa: E731
        last = run_cadence(preemptible(events, stop_after, self.state.step), on, None)
        return Message(Kind.STOP, last.step, last.epoch,
                       split=int(last.kind is EventKind.PREEMPT))  # fmt: skip

    def run_received(self) -> Message:
        """Stages after 0: every message from upstream through this stage's handlers;
        returns the STOP that ends them."""
        handlers = {
            Kind.TRAIN: self.on_train,
            Kind.EVAL: self.on_eval,
            Kind.EVAL_END: self.on_eval_end,
            Kind.EPOCH_END: self.on_epoch_end,
            Kind.CHECKPOINT: self.on_checkpoint,
        }
        while True:
            raw = self.transport.recv()  # traces "recv-wait" and "recv" itself
            msg = from_wire(raw, self.bf16_wire, self.lm, self.topk, self.data.num_classes)
            if msg.kind is Kind.STOP:
                return msg
            handlers[msg.kind](msg)

    def send(self, msg: Message) -> None:
        if not self.last:
            with self.tracer.span(Span.SEND):
                self.transport.send(to_wire(msg, self.bf16_wire, self.topk))

    # ---- per message kind -------------------------------------------------------------
    def on_train(self, msg: Message) -> None:
        assert msg.h is not None and msg.p is not None and msg.y is not None
        self.state.start_clock()
        t0 = time.perf_counter()
        h = self.fault.apply(self.state.step, msg.h) if self.fault else msg.h
        with self.tracer.span(Span.FORWARD):
            h_out, p_out, losses, _ = self.learner.forward(h, msg.p, msg.y)
        t1 = time.perf_counter()
        # Send first: the next stage starts while this one runs its backward and step.
        self.send(Message(Kind.TRAIN, msg.step, msg.epoch, h_out, p_out, msg.y))
        t2 = time.perf_counter()
        with self.tracer.span(Span.BACKWARD_STEP):
            self.learner.update(losses)
        self.losses.add(losses)
        self.state.step += 1
        self.state.samples += msg.y.shape[0]
        t3 = time.perf_counter()
        self.busy_s += (t1 - t0) + (t3 - t2)
        self.train_busy_s += (t1 - t0) + (t3 - t2)
        self.tracer.add(Span.TRAIN, t0, t3, n=int(msg.y.shape[0]))  # one per message
        if self.state.step % self.cfg.train.log_every == 0:
            self.log_train(self.losses, msg.epoch)

    def on_eval(self, msg: Message) -> None:
        assert msg.h is not None and msg.p is not None and msg.y is not None
        self.state.pause_clock()  # training time excludes evaluation
        t0 = time.perf_counter()
        with self.tracer.span(Span.EVAL):
            h_out, p_out, logits = self.learner.eval_forward(msg.h, msg.p)
        split = SPLITS[msg.split]
        if self.lm:
            self.scores[split] += depth_scores(logits, msg.y).cpu()
        else:
            self.hits[split] += torch.stack([(z.argmax(-1) == msg.y).sum() for z in logits]).cpu()
            self.counts[split] += msg.y.shape[0]
        self.busy_s += time.perf_counter() - t0
        self.send(Message(Kind.EVAL, msg.step, msg.epoch, h_out, p_out, msg.y, split=msg.split))

    def on_eval_end(self, msg: Message) -> None:
        """Append this stage's [hits, count] rows to the per-depth table travelling downstream."""
        split = SPLITS[msg.split]
        assert msg.h is not None
        if self.lm:
            rows = self.scores[split].clone()
            self.scores[split].zero_()
        else:
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
        if self.lm:  # nats over the bytes the targets stand for: bits per byte, any tokenizer
            text = self.data.test if split == "test" else self.data.val
            assert isinstance(text, TextSplit)
            self._eval_record[f"{split}_bpb_per_depth"] = (
                table[:, 2] / text.scored_bytes() / LN2
            ).tolist()
        if all(f"{s}_per_depth" in self._eval_record for s in self.expected_splits):
            record = {"kind": "eval", "step": msg.step, "epoch": msg.epoch,
                      "train_s": self.state.train_s, **self._eval_record}  # fmt: skip
            self.state.history.add(record)
            self.metrics.log(record)
            self.print_eval(record)
            self._eval_record = {}

    def on_checkpoint(self, msg: Message) -> None:
        """Every stage saves its state after the same training step: a consistent cut."""
        self.state.pause_clock()
        self.send(msg)  # downstream saves while this stage does
        self.state.epoch, self.state.batch = msg.epoch, msg.split
        self.state.messages = self.learner.messages
        with self.tracer.span(Span.CHECKPOINT):
            self.checkpoints.save(
                self.state, self.learner.stage, self.learner.optimizers, self.learner.schedulers
            )

    def on_epoch_end(self, msg: Message) -> None:
        self.state.pause_clock()
        self.state.epoch, self.state.batch = msg.epoch + 1, 0
        if self.losses.count:
            self.log_train(self.losses, msg.epoch)
        self.send(Message(Kind.EPOCH_END, msg.step, msg.epoch))

    # ---- the loop ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        stop = self.run_source() if self.first else self.run_received()
        self.send(stop)
        self.preempted = stop.split == 1
        self.state.pause_clock()
        self.transport.flush()
        wall = time.perf_counter() - start
        if not self.preempted:  # a preempted run's parameters are in its checkpoint
            save_state(self.global_state_dict(), self.run_dir, self.ctx.rank)
        st = self.transport.stats
        return self.result(
            wall, self.busy_s,
            # per training message, forward + update: what partition=auto predicts
            train_step_ms=1e3 * self.train_busy_s / max(1, self.state.step),
            recv_wait_fraction=st.recv_wait_s / wall,
            recv_fraction=st.recv_s / wall,
            send_wait_fraction=st.send_wait_s / wall,
            bytes_sent_forward=st.bytes_forward,
            bytes_sent_backward=st.bytes_backward,
            messages_sent=st.messages_sent,
        )  # fmt: skip

    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's blocks and their belief heads under the whole network's names."""
        module, start = self.learner.stage, self.learner.stage.first
        heads = {start + j: head for j, head in enumerate(module.heads)}
        return global_state_dict(module.blocks, heads, start)
