"""`sidpipe train`: the hydra entry point. A thin shell around the pure `run(cfg, run_dir)`.

Under torchrun every rank runs this app; the run directory is the one hydra gives rank 0
(pass `hydra.run.dir=DIR` to every rank, as the launch scripts do).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sidpipe.config import Config, ConfigError, register_configs

log = logging.getLogger("sidpipe")
register_configs()


def run(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to run_dir/summary.json)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.pipeline.stages == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        from sidpipe.trainer import train_single

        return train_single(cfg, run_dir)
    from sidpipe.pipeline.launch import run_pipeline

    return run_pipeline(cfg, run_dir)


def to_config(dcfg: DictConfig) -> Config:
    """Instantiate the dataclasses so every __post_init__ check runs; one-line errors."""
    try:
        cfg = OmegaConf.to_object(dcfg)
    except Exception as e:  # omegaconf wraps our ConfigError in its own exception types
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            if isinstance(cause, ConfigError):
                break
            cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
        raise ConfigError(str(cause).splitlines()[0]) from e
    assert isinstance(cfg, Config)
    return cfg


def fail(message: str, code: int = 1) -> None:
    print(f"sidpipe: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# An absolute path: hydra resolves relative paths inside a package as module names.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    from sidpipe.data import DataError
    from sidpipe.trainer import TrainingError

    try:
        cfg = to_config(dcfg)
        run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
        summary = run(cfg, run_dir)
    except (ConfigError, DataError, TrainingError) as e:
        fail(str(e))
        return
    if summary:  # rank 0 (or the launcher) prints the report
        from sidpipe.report import format_report

        print(format_report(summary), flush=True)


def main() -> None:
    """Under torchrun every rank runs the app: only rank 0 writes hydra's config dump."""
    if os.environ.get("RANK", "0") != "0" and not any(
        a.startswith("hydra.output_subdir=") for a in sys.argv[1:]
    ):
        sys.argv.append("hydra.output_subdir=null")
    _hydra_main()


if __name__ == "__main__":
    main()
