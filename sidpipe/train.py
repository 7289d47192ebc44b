"""`sidpipe train`: the hydra entry point. A thin shell around the pure `drivers.run(cfg, run_dir)`.

Under torchrun every rank runs this app; the run directory is the one hydra gives rank 0
(pass `hydra.run.dir=DIR` to every rank, as the launch scripts do).
"""

from __future__ import annotations

import os
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sidpipe import drivers
from sidpipe.config import CONF_DIR, check_command_line, register_configs, to_config
from sidpipe.drivers.summary import format_report
from sidpipe.errors import Interrupted, Preempted, SidpipeError, fail, raise_preempted

register_configs()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        cfg = to_config(dcfg)
        run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
        summary = drivers.run(cfg, run_dir)
    except Preempted as e:  # not an error: saved and stopped, exit 75 (errors.EXIT_PREEMPTED)
        print(f"sidpipe: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except SidpipeError as e:
        fail(str(e), getattr(e, "exit_code", 1))
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's convention 128 + SIGINT
        fail(str(Interrupted(signal.SIGINT)), 128 + signal.SIGINT)
    if summary:  # rank 0 (or the launcher) prints the report
        print(format_report(summary), flush=True)


def main() -> None:
    """Under torchrun every rank runs the app: only rank 0 writes hydra's config dump."""
    if os.environ.get("RANK", "0") != "0" and not any(
        a.startswith("hydra.output_subdir=") for a in sys.argv[1:]
    ):
        sys.argv.append("hydra.output_subdir=null")
    # A scheduler's stop (SIGTERM) or warning (SIGUSR1): the run saves and stops, exit 75
    # (runtime/preempt.py); until it has started, there is nothing to save.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, raise_preempted)
    try:  # hydra.main would print a mistake in seven lines, with advice wrong for a typo
        check_command_line(sys.argv[1:])
    except SidpipeError as e:
        fail(str(e))
    _hydra_main()


if __name__ == "__main__":
    main()
