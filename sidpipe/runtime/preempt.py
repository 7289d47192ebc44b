"""Preemption: a scheduler's SIGUSR1 (`#SBATCH --signal=USR1@120`) or SIGTERM asks a run to
save a checkpoint at the next training-step boundary and stop (exit status 75,
`errors.EXIT_PREEMPTED`); `resume=auto` continues it.

A signal may reach any stage. The stage that gets it raises a local flag and publishes it on
the control plane (the rendezvous store); the stage that decides where to stop reads both:
SID's stage 0, the only source of messages, sends CHECKPOINT and a preempting STOP, so every
stage saves the same consistent cut as a periodic checkpoint; in BP every rank runs the
cadence, so the ranks agree on the step to stop after (`Preemption.agreed`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REQUEST_KEY = "sidpipe/preempt"  # the signal's number, set by the stage that got it
STEP_KEY = "sidpipe/preempt_step"  # BP: the step every rank stops after


class Preemption:
    """A preemption request: set by a signal here, or by another stage through `store`.

    poll_s: how often `requested()` asks the store (0: every call). Asking costs a round trip
    to the store; a local signal is seen at once."""

    def __init__(self, store: Any = None, poll_s: float = 0.5):
        self.store, self.poll_s = store, poll_s
        self.signum: int | None = None
        self._next_poll = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> Preemption:
        """Catch PREEMPT_SIGNALS in this process (main thread only; a no-op elsewhere)."""
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signum = signum
        if self.store is not None:  # a Python handler runs between bytecodes: no store call
            with contextlib.suppress(Exception):  # is cut in half; a gone store is fine
                self.store.set(REQUEST_KEY, str(signum))

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a preemption request"

    def requested(self) -> bool:
        if self.signum is None and self.store is not None and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_s
            with contextlib.suppress(Exception):  # no control plane: only local signals count
                if self.store.check([REQUEST_KEY]):
                    self.signum = int(self.store.get(REQUEST_KEY).decode())
        return self.signum is not None

    def agreed(self, done: int) -> bool:
        """BP (every rank runs the cadence, in lockstep within one step): stop after `done`
        steps? The first rank to see the request proposes done + 2; the store keeps the first
        proposal, so every rank stops after the same step. No rank is more than one step
        ahead of another, and every rank asks at every step, so none has passed it."""
        if not self.requested():
            return False
        if self.store is None:
            return True
        stop = int(self.store.compare_set(STEP_KEY, "", str(done + 2)).decode())
        return done >= stop
