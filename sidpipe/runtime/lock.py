"""One writer per output directory: a run, a benchmark or a study takes an exclusive lock on
its directory for its whole lifetime, so a second one started on the same directory (even a
second later, when both would pass the "already holds a run" check) is refused in one line
instead of silently mixing its files with the first one's.

The lock is `flock` on `DIR/.sidpipe.lock`: the kernel releases it when the holder exits,
however it exits (kill -9 included), so a dead run's lock is never stale. The file itself
stays (unlinking it would let a third process lock a fresh inode while a second one still
waits on the old). It names the holder (pid, host, command, start time) for the refusal.
flock is per host: on a network file system shared by several nodes it may not exclude a
run on another node (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from sidpipe.errors import ConfigError

LOCK_FILE = ".sidpipe.lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return f"pid {int(info['pid'])} on {info['host']}, since {since}: {info['command']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown"


@contextlib.contextmanager
def exclusive(directory: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold DIR's lock for the body; ConfigError (one line) if another process holds it or
    the directory cannot be created or written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(
            f"cannot use {directory} as the {what} directory: {e.strerror or e}"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{what} directory {directory} is in use by another sidpipe {what} "
                f"({_holder(fd)}); wait for it to end, or give this {what} its own directory"
            ) from None
        with contextlib.suppress(OSError):  # who holds it: for the refusal's message only
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                    "command": " ".join(sys.argv)[:300]}  # fmt: skip
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        yield directory
    finally:
        os.close(fd)  # releases the lock
