"""`run`: train a config with the driver it asks for (single-process, or a SID or BP
pipeline through `launch`), in its locked, checked run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sidpipe.config import Config
from sidpipe.drivers.launch import after_restart, run_pipeline
from sidpipe.drivers.rundir import prepare_run_dir
from sidpipe.runtime.lock import exclusive


def run(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to run_dir/summary.json).

    The run directory is locked for the run's lifetime (runtime/lock.py): by this process
    when it launches the stages or trains alone, by rank 0 under torchrun."""
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 holds the lock
        run_dir.mkdir(parents=True, exist_ok=True)
        return _run_locked(cfg, run_dir)
    with exclusive(run_dir):
        return _run_locked(cfg, run_dir)


def _run_locked(cfg: Config, run_dir: Path) -> dict[str, Any]:
    cfg = after_restart(cfg, run_dir)  # torchrun restarted every stage: continue the run
    done = prepare_run_dir(cfg, run_dir)
    if done is not None:
        print(f"sidpipe: the run in {run_dir} is already complete (summary.json); "
              "nothing to do", flush=True)  # fmt: skip
        return done if os.environ.get("RANK", "0") == "0" else {}
    if cfg.pipeline.stages == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        from sidpipe.drivers.single import train_single  # not in a pipeline's launcher

        return train_single(cfg, run_dir)
    return run_pipeline(cfg, run_dir)
