"""The run directory's lifecycle: one run per directory, and what resume= does with the
outputs a finished or a died run left in it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sidpipe.config import Config, to_dict
from sidpipe.errors import ConfigError
from sidpipe.runtime.logger import METRICS_FILE, trim_metrics
from sidpipe.runtime.resume import (
    check_compatible,
    checkpoint_root,
    drop_partial,
    published,
    read_meta,
    resolve_resume,
    step_of,
)

# Keys a finished run may be resumed with, to train it further
RUN_LENGTH = ("train.epochs=", "train.max_steps=")
# What a run writes into its directory (hydra's own .hydra/ and *.log are not ours).
RUN_OUTPUTS = ("summary.json", "metrics.jsonl", "model", "failure.txt", "trace.json",
               "partition_auto.json")  # fmt: skip


def prepare_run_dir(cfg: Config, run_dir: Path) -> dict[str, Any] | None:
    """A run directory holds one run, never a mix of two. A fresh run (no resume=) refuses a
    directory that holds another run's outputs; resume=auto on a finished run returns its
    summary untouched (a cluster requeue), or continues it if only train.epochs or
    train.max_steps changed (train it further); resume=auto with nothing to resume removes the
    outputs of the attempt that died before its first checkpoint, then starts clean; a resume
    from a checkpoint first drops the metrics.jsonl lines logged after it."""
    used = [n for n in RUN_OUTPUTS if (run_dir / n).exists()]
    if os.environ.get("RANK", "0") == "0":  # the lock holder: no stage of this run writes yet
        drop_partial(checkpoint_root(cfg, run_dir))
    ckpts = published(checkpoint_root(cfg, run_dir))
    if cfg.resume is None:
        if used or ckpts:
            found = ", ".join(used + (["checkpoints/"] if ckpts else []))
            raise ConfigError(
                f"run directory {run_dir} already holds a run ({found}): continue it with "
                "resume=auto, or give the new run its own hydra.run.dir"
            )
        return None
    if cfg.resume == "auto" and (run_dir / "summary.json").exists():
        summary = _read_summary(run_dir / "summary.json")
        changed = _changed(summary["config"], to_dict(cfg))
        if not changed:
            return summary
        if not all(c.startswith(RUN_LENGTH) for c in changed):
            raise ConfigError(
                f"the run in {run_dir} finished with another config ({'; '.join(changed[:3])}); "
                "resume=auto continues a run only with the same config (train.epochs and "
                "train.max_steps may grow): give the new run its own hydra.run.dir"
            )
        # else a longer run: continue from its newest checkpoint, below
    start = resolve_resume(cfg, run_dir)
    if start is not None:  # another stage count or method: refused before any stage starts
        check_compatible(read_meta(start), cfg, None, start)
    finished = (run_dir / "summary.json").exists()  # its outputs stay until replaced
    owner = os.environ.get("RANK", "0") == "0"  # the lock holder; other ranks only read
    if cfg.resume == "auto" and start is None and not finished and owner:
        for name in used:  # a died attempt's partial outputs: nothing of it can be continued
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif start is not None and owner:
        # The resumed run logs the steps after its checkpoint again: one line per step.
        # (Under torchrun rank 0 trims; no other stage logs before rank 0 sends it work.)
        trim_metrics(run_dir / METRICS_FILE, step_of(start))
    return None


def _read_summary(path: Path) -> dict[str, Any]:
    """A finished run's summary.json (written atomically: damage is not a crash of ours)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        summary = f"unreadable ({type(e).__name__})"
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        what = summary if isinstance(summary, str) else "without the run's config"
        raise ConfigError(
            f"{path} is damaged ({what}): move it away to resume the run from its newest "
            "checkpoint, or give a new run its own hydra.run.dir"
        )
    return summary


def _changed(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ ('pipeline.stages=2, now 3'), ignoring how a run is started."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in ("resume", "run_dir", "progress") or name.startswith("logger"):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, name + ".")
        elif a != b:
            out.append(f"{name}={a}, now {b}")
    return out
