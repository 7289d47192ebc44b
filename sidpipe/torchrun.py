"""`sidpipe-torchrun ARGS` (`python -m sidpipe.torchrun ARGS`): torchrun, without its
tracebacks. The launch scripts use it when it is installed.

torchrun's `main` is wrapped in torch's `@record`, which prints the agent's own traceback
(a SignalException when a scheduler's signal reached it) or a ChildFailedError table after
the stages have already said, in one line each, what happened (preempted, interrupted, or
which stage failed at which step and why). This runs torchrun's `run` with the same
arguments, and ends those two cases in one line: 128 + the signal for a signal, 1 for a
failed stage. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # the agent's lines ("Sending process ... closing signal", "failed (exitcode: 1)")
    # repeat what the stages say, and the line below names every failed rank
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except SignalException as e:  # the agent has passed it on to the stages and waited
        print(f"sidpipe-torchrun: stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        failed = ", ".join(
            f"rank {r} ({f'signal {f.signal_name()}' if f.exitcode < 0 else f'exit {f.exitcode}'})"
            for r, f in sorted(e.failures.items())
        )
        print(f"sidpipe-torchrun: error: {failed}; the stages' own lines above say why",
              file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(1)


if __name__ == "__main__":
    main()
