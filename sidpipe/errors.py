"""The errors a user can cause, each reported as one line that names the problem.

Every entry point catches `SidpipeError` and prints `sidpipe: error: <message>` with no
traceback (`fail`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import NoReturn


class SidpipeError(Exception):
    """Base of every user-facing error: the message is one line saying what to do."""


class ConfigError(SidpipeError, ValueError):
    """A bad setting, reported in one line that names the key."""


class DataError(SidpipeError, RuntimeError):
    """A dataset cannot be provided."""


class DataConfigError(DataError, ValueError):
    """A data.* setting is invalid. Both a DataError and a ValueError, so either catch works."""


class TrainingError(SidpipeError, RuntimeError):
    """A run that cannot go on (NaN loss, a failed stage, ...): names the step and the reason."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used, in one line naming its path."""


class Interrupted(SidpipeError):
    """A run stopped by a signal without a checkpoint (Ctrl-C): exits 128 + the signal.
    A scheduler's SIGTERM or SIGUSR1 preempts instead (`Preempted`, exit 75)."""

    def __init__(self, signum: int):
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


# The exit status of a preempted run (os.EX_TEMPFAIL, "try again later"): every stage saved
# a checkpoint and stopped; `resume=auto` continues it. Distinct from a failure (1) and from
# an interruption without a checkpoint (128 + signal).
EXIT_PREEMPTED = 75


class Preempted(SidpipeError):
    """A run stopped by a preemption signal (SIGUSR1, SIGTERM) after saving a checkpoint."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signame: str, step: int, checkpoint: str | None):
        self.step, self.checkpoint = step, checkpoint
        saved = f"checkpoint {checkpoint}" if checkpoint else "nothing saved"
        super().__init__(
            f"preempted by {signame} at step {step} ({saved}); continue it with resume=auto"
        )


def raise_preempted(signum: int, frame: object) -> None:
    """A signal handler for the time before a run's own (runtime/preempt.py) takes over:
    nothing trained yet, nothing to save."""
    raise Preempted(signal.Signals(signum).name, 0, None)


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"sidpipe: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as sidpipe's one line (exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(f"{self.prog}: {message} (see {self.prog} --help)", 2)
