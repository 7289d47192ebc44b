"""The three drivers: single-process (`single`), the SID pipeline (`sid`) and the BP
pipeline (`bp`), started by `launch`; `run` picks one for a config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sidpipe.config import Config
from sidpipe.drivers.launch import Planner, run_pipeline
from sidpipe.drivers.single import train_single


def run(cfg: Config, run_dir: str | Path, planner: Planner | None = None) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to run_dir/summary.json).

    planner resolves pipeline.partition=auto (bench/balance.py's `plan_partition`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.pipeline.stages == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return train_single(cfg, run_dir)
    return run_pipeline(cfg, run_dir, planner)
