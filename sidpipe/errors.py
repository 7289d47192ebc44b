"""The errors a user can cause, each reported as one line that names the problem.

Every entry point catches `SidpipeError` and prints `sidpipe: error: <message>` with no
traceback (`fail`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

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
    """A run stopped by a signal (Ctrl-C, a scheduler's SIGTERM): exits 128 + the signal."""

    def __init__(self, signum: int):
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def raise_interrupted(signum: int, frame: object) -> None:
    """A signal handler: SIGTERM ends the run like Ctrl-C, one line, exit 143."""
    raise Interrupted(signum)


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"sidpipe: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
