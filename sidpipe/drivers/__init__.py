"""The three drivers: single-process (`single`), the SID pipeline (`sid`) and the BP
pipeline (`bp`), started by `launch`; `run` picks one for a config, after checking the run
directory's lifecycle."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sidpipe.config import Config, to_dict
from sidpipe.drivers.launch import Planner, after_restart, run_pipeline
from sidpipe.errors import ConfigError
from sidpipe.runtime.lock import exclusive
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


def run(cfg: Config, run_dir: str | Path, planner: Planner | None = None) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to run_dir/summary.json).

    planner resolves pipeline.partition=auto (bench/balance.py's `plan_partition`).
    The run directory is locked for the run's lifetime (runtime/lock.py): by this process
    when it launches the stages or trains alone, by rank 0 under torchrun."""
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 holds the lock
        run_dir.mkdir(parents=True, exist_ok=True)
        return _run_locked(cfg, run_dir, planner)
    with exclusive(run_dir):
        return _run_locked(cfg, run_dir, planner)


def _run_locked(cfg: Config, run_dir: Path, planner: Planner | None) -> dict[str, Any]:
    cfg = after_restart(cfg, run_dir)  # torchrun restarted every stage: continue the run
    done = prepare_run_dir(cfg, run_dir)
    if done is not None:
        print(f"sidpipe: the run in {run_dir} is already complete (summary.json); "
              "nothing to do", flush=True)  # fmt: skip
        return done if os.environ.get("RANK", "0") == "0" else {}
    if cfg.pipeline.stages == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        from sidpipe.drivers.single import train_single  # not in a pipeline's launcher

        return train_single(cfg, run_dir)
    return run_pipeline(cfg, run_dir, planner)
