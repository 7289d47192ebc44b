"""The run cadence and the run state, shared by all three drivers (docs/design.md §4).

`cadence` is the one event source: TRAIN for every batch, CHECKPOINT every
`checkpoint.every_n_steps`, EVAL every `train.eval_every_steps` and at epoch ends (and at the
end), EPOCH_END, and a final STOP. `run_cadence` is the one loop over it: each driver hands
it one handler per event kind. The single-process trainer and the BP pipeline act on the
events; the SID pipeline's stage 0 turns them into messages, so every stage sees the same
sequence of events in the same order as the sequential trainer.

`RunState` is everything a checkpoint must restore besides parameters and optimizer state:
one object, one set of keys, for every driver.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from torch import Tensor

from sidpipe.config import Config, TrainConfig
from sidpipe.data import DataBundle


class EventKind(Enum):
    TRAIN = "train"  # one batch: forward, update
    EVAL = "eval"  # evaluate every split
    CHECKPOINT = "checkpoint"  # save after the step just taken
    EPOCH_END = "epoch_end"
    STOP = "stop"
    PREEMPT = "preempt"  # stop early: the run is not finished (a CHECKPOINT precedes it)


@dataclass
class Event:
    kind: EventKind
    step: int  # training steps done (TRAIN: including this batch)
    epoch: int
    batch: int = 0  # the next batch's index in `epoch`: where a resume starts
    x: Any = None  # TRAIN: the batch, as the driver's `epoch_batches` yields it
    y: Any = None


def cadence(
    train: TrainConfig,
    checkpoint_every: int,
    n_steps: int,
    start: tuple[int, int, int],
    epoch_batches: Callable[[int, int], Iterable[tuple[Any, Any]]],
) -> Iterator[Event]:
    """Events of a run from `start` = (step, epoch, batch) until `n_steps` batches are done.

    epoch_batches(epoch, first_batch) yields the (x, y) batches of one epoch from index
    first_batch on; what x and y are (tensors, or None on a rank that does not need them)
    is the driver's business.
    """
    step, epoch, first = start
    every = train.eval_every_steps
    if step >= n_steps and train.final_eval:  # resumed from the last step's checkpoint (the
        yield Event(EventKind.EVAL, step, epoch)  # run died before its summary): evaluate it
    while step < n_steps:
        for i, (x, y) in enumerate(epoch_batches(epoch, first), start=first):
            step += 1
            yield Event(EventKind.TRAIN, step, epoch, i + 1, x, y)
            if checkpoint_every and step % checkpoint_every == 0:
                yield Event(EventKind.CHECKPOINT, step, epoch, i + 1)
            if step >= n_steps:
                break
            if every and step % every == 0:
                yield Event(EventKind.EVAL, step, epoch)
        first = 0
        done = step >= n_steps
        if train.eval_every_epoch and not done or done and train.final_eval:
            yield Event(EventKind.EVAL, step, epoch)
        yield Event(EventKind.EPOCH_END, step, epoch)
        epoch += 1
    yield Event(EventKind.STOP, step, epoch)


def preemptible(
    events: Iterable[Event], stop_after: Callable[[int], bool], saved: int
) -> Iterator[Event]:
    """The events, ended early when `stop_after(steps done)`, asked before every TRAIN event,
    says so: then a CHECKPOINT of the steps done (unless step `saved`, where the run resumed,
    or the CHECKPOINT just before, already holds them) and PREEMPT. A fresh run passes
    saved=0: stopped before its first step it has nothing to save."""
    for ev in events:
        if ev.kind is EventKind.TRAIN and stop_after(ev.step - 1):
            done = ev.step - 1
            if done != saved:  # the position after `done` steps: this batch is the next one
                yield Event(EventKind.CHECKPOINT, done, ev.epoch, ev.batch - 1)
            yield Event(EventKind.PREEMPT, done, ev.epoch)
            return
        if ev.kind is EventKind.CHECKPOINT:
            saved = ev.step
        yield ev


Handlers = Mapping[EventKind, Callable[[Event], None]]


def run_cadence(events: Iterable[Event], on: Handlers, state: RunState | None) -> Event:
    """The one event loop of every driver: hand each event to the driver's handler for its
    kind (a kind without one needs nothing) until STOP or PREEMPT, and return that event.

    With `state`, the loop keeps the run's clock (training time runs while TRAIN events
    are handled, paused by every other event) and position (moved past each TRAIN and
    EPOCH_END event once its handler has run: a handler reads the event's own step). The
    SID pipeline passes None: its stage 0 turns events into messages, and every stage
    keeps its own state from those."""
    for ev in events:
        if ev.kind in (EventKind.STOP, EventKind.PREEMPT):
            if state is not None:
                state.pause_clock()
            return ev
        if state is not None:
            if ev.kind is EventKind.TRAIN:
                state.start_clock()
            else:
                state.pause_clock()
        handler = on.get(ev.kind)
        if handler is not None:
            handler(ev)  # state (if any) still at the position before the event
        if state is not None:
            state.advance(ev)
    raise AssertionError("a cadence ends with STOP or PREEMPT")


def steps_per_epoch(cfg: Config, data: DataBundle, drop_last: bool = False) -> int:
    n = len(data.train) / cfg.train.batch_size
    return math.floor(n) if drop_last else math.ceil(n)


def total_steps(cfg: Config, data: DataBundle, drop_last: bool = False) -> int:
    """Batches a run trains. drop_last: full batches only (the BP pipeline schedules)."""
    n = cfg.train.epochs * steps_per_epoch(cfg, data, drop_last)
    return min(n, cfg.train.max_steps) if cfg.train.max_steps else n


@dataclass
class History:
    """Per-epoch evaluations; picks last, best-on-test and validation-selected accuracy."""

    epochs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.epochs.append(record)

    def selection(self) -> dict[str, Any]:
        if not self.epochs:
            return {}
        best_test = max(self.epochs, key=lambda r: r["test_per_depth"][-1])
        out = {
            "best_epoch_test_accuracy": best_test["test_per_depth"][-1],
            "best_epoch": best_test["epoch"],
        }
        with_val = [r for r in self.epochs if "val_per_depth" in r]
        if with_val:
            chosen = max(with_val, key=lambda r: r["val_per_depth"][-1])
            out["val_selected_epoch"] = chosen["epoch"]
            out["val_selected_test_accuracy"] = chosen["test_per_depth"][-1]
            out["val_accuracy"] = chosen["val_per_depth"][-1]
        return out


def sched_state(sched: Any) -> dict[str, Any] | None:
    """A scheduler's counters (its lambdas are code: rebuilt from the config, not saved)."""
    if sched is None:
        return None

    def plain(v: Any) -> Any:  # a graph-safe optimizer's lr is a tensor: JSON wants floats
        if isinstance(v, Tensor):
            return float(v)
        return [plain(x) for x in v] if isinstance(v, list) else v

    return {k: plain(v) for k, v in sched.state_dict().items() if k != "lr_lambdas"}


@dataclass
class RunState:
    """Where a run is. Saved as JSON in every checkpoint; restored on resume."""

    step: int = 0  # training steps (batches, or messages on a SID stage) done
    epoch: int = 0
    batch: int = 0  # the next batch's index in `epoch`
    samples: int = 0  # training samples seen
    train_s: float = 0.0  # training time, evaluation and checkpoints excluded
    messages: int = 0  # SID: messages since the start (sid.accumulate_steps counts them)
    history: History = field(default_factory=History)
    schedulers: list[dict[str, Any] | None] = field(default_factory=list)
    _clock: float | None = field(default=None, repr=False)

    def advance(self, event: Event) -> None:
        """Move the position past a TRAIN or EPOCH_END event."""
        if event.kind is EventKind.TRAIN:
            self.step, self.epoch, self.batch = event.step, event.epoch, event.batch
        elif event.kind is EventKind.EPOCH_END:
            self.epoch, self.batch = event.epoch + 1, 0

    @property
    def position(self) -> tuple[int, int, int]:
        return self.step, self.epoch, self.batch

    # Training time: runs while TRAIN events are handled, paused by every other event.
    def start_clock(self) -> None:
        if self._clock is None:
            self._clock = time.perf_counter()

    def pause_clock(self) -> None:
        if self._clock is not None:
            self.train_s += time.perf_counter() - self._clock
            self._clock = None

    def to_json(self, schedulers: list[Any]) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out["history"] = self.history.epochs
        out["schedulers"] = [sched_state(s) for s in schedulers]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], schedulers: list[Any]) -> RunState:
        state = cls(**{**d, "history": History(d["history"])})
        for sched, saved in zip(schedulers, state.schedulers, strict=True):
            if sched is not None and saved is not None:
                sched.load_state_dict({**sched.state_dict(), **saved})
        return state
