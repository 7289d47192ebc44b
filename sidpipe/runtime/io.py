"""Run outputs: atomic JSON writes, the metrics.jsonl stream, memory and timing helpers."""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON via temp file + rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mib(n: float) -> str:
    """Bytes as MiB with one decimal, for reports ('18.4')."""
    return f"{n / 2**20:.1f}"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "value"):  # enums
        return obj.value
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class JsonlWriter:
    """Appends one JSON object per line; flushed each line so a crash keeps what was logged."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, default=_json_default) + "\n")
        self._f.flush()

    log = write  # same call as RunLogger.log, for stages that only append lines

    def close(self, exit_code: int = 0) -> None:
        self._f.close()


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated by this process. CPU: peak resident set size of this process."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def save_state(state: dict[str, torch.Tensor], run_dir: str | Path, stage: int) -> Path:
    """Final parameters of one stage, named as in the whole network (blocks.{i}, heads.{i}).

    `model/stage{r}.pt` per stage; together they are the network's state_dict. Atomic.
    """
    path = Path(run_dir) / "model" / f"stage{stage}.pt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_torch(path, {k: v.detach().cpu() for k, v in state.items()})
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def write_torch(path: Path, obj: Any) -> None:
    """torch.save to path atomically. Serialised in memory first, then written as plain
    bytes: a full disk is then the OS's own "No space left on device", not torch's
    "enforce fail at inline_container.cc ... unexpected pos" from inside its zip writer."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_state(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """Merge every stage's saved parameters (weights only: no code runs on load)."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted((Path(run_dir) / "model").glob("stage*.pt")):
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def timed_call(fn: Any, device: torch.device) -> float:
    """Seconds one call of fn takes, the device's queued work included (CUDA is async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
