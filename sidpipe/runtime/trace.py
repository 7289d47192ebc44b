"""Per-stage spans, written as one Chrome-trace JSON (open it in Perfetto or chrome://tracing)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from enum import Enum
from typing import Any

import torch


class Span(str, Enum):
    """Every span name a stage records (the trace's names, and the BP clock's states)."""

    TRAIN = "train"  # one per training batch or message: the benchmarks' throughput unit
    FORWARD = "forward"
    BACKWARD = "backward"  # BP: a microbatch's backward
    BACKWARD_STEP = "backward+step"  # SID: local backward and optimizer step
    LOSS = "loss"
    OPTIMIZER = "optimizer"
    EVAL = "eval"
    CHECKPOINT = "checkpoint"
    DATA = "data"  # preparing batches: neither busy nor waiting
    SEND = "send"
    SEND_WAIT = "send-wait"
    RECV_WAIT = "recv-wait"  # idle: nothing has arrived
    RECV = "recv"  # a header is in, the payload is arriving
    SETUP = "setup"  # not traced
    DONE = "done"  # not traced


class Tracer:
    """Records (name, start, duration) spans of one stage when enabled; a no-op otherwise."""

    def __init__(self, stage: int, enabled: bool):
        self.stage, self.enabled = stage, enabled
        self._spans: list[tuple[Span, float, float, dict | None]] = []
        # perf_counter is per process; anchor it to the wall clock so stages line up.
        self._offset = time.time() - time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: Span) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        # Name the span for torch.profiler too, but only when one is recording (cost).
        ctx = (
            torch.profiler.record_function(f"stage{self.stage}/{name.value}")
            if torch.autograd.profiler._is_profiler_enabled
            else contextlib.nullcontext()
        )
        with ctx:
            t0 = time.perf_counter()
            yield
            self._spans.append((name, t0, time.perf_counter() - t0, None))

    def add(self, name: Span, t0: float, t1: float, **args: Any) -> None:
        """A span measured by the caller (perf_counter times), with optional arguments."""
        if self.enabled:
            self._spans.append((name, t0, t1 - t0, args or None))

    def events(self) -> list[dict[str, Any]]:
        events = []
        for n, t0, d, args in self._spans:
            ev = {"name": Span(n).value, "ph": "X", "pid": 0, "tid": self.stage, "cat": "stage",
                  "ts": (t0 + self._offset) * 1e6, "dur": d * 1e6}  # fmt: skip
            if args:
                ev["args"] = args
            events.append(ev)
        return events


def chrome_trace(per_stage_events: list[list[dict[str, Any]]]) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    for stage, evs in enumerate(per_stage_events):
        events.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": 0,
                "tid": stage,
                "args": {"name": f"stage {stage}"},
            }
        )
        events.extend(evs)
    t0 = min((e["ts"] for e in events if "ts" in e), default=0.0)
    for e in events:
        if "ts" in e:
            e["ts"] -= t0
    return {"traceEvents": events, "displayTimeUnit": "ms"}
