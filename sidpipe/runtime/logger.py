"""Run loggers: metrics.jsonl always, plus Weights & Biases when `logger=wandb`.

Called by the process that owns the metrics (rank 0 in a single process, the last stage in a
pipeline) at log intervals and epoch ends only, never per step in the hot loop: a record has
already been reduced to Python numbers (one host sync) when it gets here.

    rl = make_logger(run_dir, to_dict(cfg), cfg.logger)
    rl.log({"kind": "train", "step": 20, "epoch": 0, "loss": [0.9, 0.7]})
    rl.log({"kind": "eval", "step": 28, "epoch": 0, "test_per_depth": [0.81, 0.93]})
    rl.summary(summary)   # the summary.json dict
    rl.close()

wandb keys: nested dicts and lists are flattened with "/" (`loss/0`, `test_per_depth/3`,
`per_stage/1/busy_fraction`); only numbers go to wandb, strings and None stay in the JSONL.
Every wandb row carries `step` (the training step) and `epoch`, and `step` is declared the
x-axis of every metric, so train and eval rows logged at the same or an earlier step are
never dropped. wandb files go under `<run_dir>/wandb/` (`offline-run-*` by default; upload
later with `wandb sync <run_dir>/wandb/offline-run-*`).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sidpipe.errors import ConfigError
from sidpipe.runtime.io import JsonlWriter

log = logging.getLogger("sidpipe.runtime.logger")

METRICS_FILE = "metrics.jsonl"


def trim_metrics(path: Path, step: int) -> int:
    """Before a resumed run appends to metrics.jsonl: drop the lines the died attempt logged
    after the checkpoint it resumes from (step > `step`; the resumed run logs those steps
    again) and a last line cut short by the crash. Returns the number of lines dropped.
    Written via a temporary file and a rename, so a second crash loses nothing."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line half-written when the process died
            dropped += 1
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.trim")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(path)
    return dropped


class LoggerError(ConfigError):
    """The chosen logger cannot start (reported in one line by `sidpipe train`)."""


def _scalar(value: Any) -> float | int | bool | None:
    """A plain Python number for wandb, or None for anything that is not one scalar."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and hasattr(value, "numel"):  # a one-element tensor
        try:
            if value.numel() == 1:
                return _scalar(value.item())
        except (RuntimeError, TypeError, ValueError):
            return None
    return None


def flatten(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (`a/b/0`, leaf) pairs: dict keys and list indices joined with '/'."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}/")
        elif isinstance(value, (list, tuple)):
            yield from flatten({str(i): v for i, v in enumerate(value)}, f"{name}/")
        else:
            yield name, value


def scalars(record: Mapping[str, Any]) -> dict[str, float | int | bool]:
    """The flattened numeric leaves of a record (strings, None and tensors > 1 element dropped)."""
    out: dict[str, float | int | bool] = {}
    for name, value in flatten(record):
        v = _scalar(value)
        if v is not None:
            out[name] = v
    return out


def _format(record: Mapping[str, Any]) -> str:
    parts = []
    for name, value in scalars(record).items():
        if isinstance(value, float) and math.isfinite(value):
            parts.append(f"{name}={value:.4g}")
        else:
            parts.append(f"{name}={value}")
    return f"[{record.get('kind', 'log')}] " + " ".join(parts)


def _plain_config(cfg_dict: Any) -> dict[str, Any]:
    """A plain dict for wandb: DictConfig nodes resolved (interpolations, enums as values)."""
    if cfg_dict is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg_dict, DictConfig):
        return OmegaConf.to_container(cfg_dict, resolve=True, enum_to_str=True)  # type: ignore[return-value]
    return dict(cfg_dict)


class RunLogger:
    """metrics.jsonl (one flushed JSON line per record) plus a DEBUG console line.

    The console logger adds nothing to stdout of its own: progress bars and per-epoch lines
    are the trainer's; `log.debug` here shows every record with
    `hydra.verbose=sidpipe.runtime.logger`.
    """

    name = "console"

    def __init__(self, run_dir: str | Path, cfg_dict: Any, logger_cfg: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = _plain_config(cfg_dict)
        self.logger_cfg = logger_cfg
        self._jsonl: JsonlWriter | None = JsonlWriter(self.run_dir / METRICS_FILE)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def log(self, record: dict[str, Any]) -> None:
        """Append the record to metrics.jsonl (as given) and forward its numbers."""
        if self._jsonl is None:
            raise RuntimeError("RunLogger.log() after close()")
        self._jsonl.write(record)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", _format(record))
        self._forward(record)

    def replay(self, path: Path, skip_stage: int) -> None:
        """Forward (not re-write) the JSONL lines other pipeline stages appended to `path`.

        Stages other than the logger's own write metrics.jsonl directly; their numbers reach
        wandb here, at the end, so the training hot loop carries no metric traffic.
        """
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if record.get("stage", skip_stage) != skip_stage or record.get("kind") == "eval":
                    self._forward(record)

    def summary(self, summary: dict[str, Any]) -> None:
        """The final summary (summary.json itself is written by the trainer)."""
        self._forward_summary(scalars(summary))

    def close(self, exit_code: int = 0) -> None:
        """Flush and close; safe to call twice. A non-zero exit_code marks the run failed."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    # Backends override these two.
    def _forward(self, record: dict[str, Any]) -> None:
        pass

    def _forward_summary(self, values: dict[str, float | int | bool]) -> None:
        pass

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


class WandbLogger(RunLogger):
    """RunLogger that also streams every record's numbers to a wandb run under run_dir/wandb."""

    name = "wandb"

    def __init__(self, run_dir: str | Path, cfg_dict: Any, logger_cfg: Any = None) -> None:
        super().__init__(run_dir, cfg_dict, logger_cfg)
        wcfg = getattr(logger_cfg, "wandb", None)
        mode = getattr(wcfg, "mode", None) or "offline"
        try:
            self.run = self._init(wcfg, mode)
        except BaseException:
            super().close()
            raise
        self.mode = mode

    def _init(self, wcfg: Any, mode: str) -> Any:
        try:
            import wandb  # lazily: importing wandb costs ~0.5 s
        except ImportError as e:
            raise LoggerError(
                f"logger=wandb needs the wandb package ({e}); "
                "pip install wandb, or use logger=console"
            ) from None
        try:
            run = wandb.init(
                project=getattr(wcfg, "project", None) or "sidpipe",
                entity=getattr(wcfg, "entity", None),
                mode=mode,
                dir=str(self.run_dir),  # -> <run_dir>/wandb/<mode>-run-*
                config=self.config,
                reinit="create_new",  # an independent run; never touches another active one
            )
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
        except Exception as e:  # wandb raises many types (UsageError, CommError, timeouts)
            first = (str(e).strip().splitlines() or [""])[0]
            raise LoggerError(
                f"logger=wandb: wandb.init failed (mode={mode}): {type(e).__name__}: {first}; "
                "try logger.wandb.mode=offline or logger=console"
            ) from None
        return run

    def _forward(self, record: dict[str, Any]) -> None:
        values = scalars(record)  # "kind" and other strings stay in the JSONL only
        if values:
            self.run.log(values)

    def _forward_summary(self, values: dict[str, float | int | bool]) -> None:
        self.run.summary.update(values)

    def close(self, exit_code: int = 0) -> None:
        """Finish the run and wait until its files are complete on disk.

        wandb 0.31's finish() can return before its service has flushed the run's .wandb
        file (measured: 2 of 40 runs still held only the 7-byte header right after finish).
        wandb.teardown() waits for the service, so after close() the offline run is whole
        and can be read or synced at once; wandb otherwise leaves this to an atexit hook,
        which its docs call unreliable under multiprocessing (spawned pipeline stages).
        """
        run, self.run = getattr(self, "run", None), None
        try:
            if run is not None:
                run.finish(exit_code=exit_code)
                import wandb

                if wandb.run is None:  # no run of the user's own in this process to cut short
                    wandb.teardown()  # the exit code is recorded by finish() already
        finally:
            super().close(exit_code)


def stage_logger(rank: int, run_dir: str | Path, cfg_dict: Any, logger_cfg: Any) -> Any:
    """A pipeline stage's metrics writer. Every stage appends its own lines to metrics.jsonl
    (O_APPEND: safe across processes); rank 0 also owns the logger backend (wandb), and
    launch.stage_main forwards the other stages' lines to it at the end of the run."""
    if rank == 0:
        return make_logger(run_dir, cfg_dict, logger_cfg)
    return JsonlWriter(Path(run_dir) / METRICS_FILE)


def make_logger(run_dir: str | Path, cfg_dict: Any, logger_cfg: Any = None) -> RunLogger:
    """The logger named by `logger.name` (console when logger_cfg is None)."""
    name = getattr(logger_cfg, "name", None) or "console"
    if name == "console":
        return RunLogger(run_dir, cfg_dict, logger_cfg)
    if name == "wandb":
        if getattr(getattr(logger_cfg, "wandb", None), "mode", None) == "disabled":
            return RunLogger(run_dir, cfg_dict, logger_cfg)
        return WandbLogger(run_dir, cfg_dict, logger_cfg)
    raise LoggerError(f"logger.name={name!r} must be console or wandb")
