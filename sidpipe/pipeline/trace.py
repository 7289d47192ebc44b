"""Per-stage spans, written as one Chrome-trace JSON (open it in Perfetto or chrome://tracing)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch


class Tracer:
    """Records (name, start, duration) spans of one stage when enabled; a no-op otherwise."""

    def __init__(self, stage: int, enabled: bool):
        self.stage, self.enabled = stage, enabled
        self._spans: list[tuple[str, float, float]] = []
        # perf_counter is per process; anchor it to the wall clock so stages line up.
        self._offset = time.time() - time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with torch.profiler.record_function(f"stage{self.stage}/{name}"):
            t0 = time.perf_counter()
            yield
            self._spans.append((name, t0, time.perf_counter() - t0))

    def events(self) -> list[dict[str, Any]]:
        return [
            {
                "name": n,
                "ph": "X",
                "pid": 0,
                "tid": self.stage,
                "cat": "stage",
                "ts": (t0 + self._offset) * 1e6,
                "dur": d * 1e6,
            }
            for n, t0, d in self._spans
        ]


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
