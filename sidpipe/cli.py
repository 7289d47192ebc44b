"""`sidpipe <command> [hydra overrides]`: train (default), bench, export, eval."""

from __future__ import annotations

import sys

USAGE = """usage: sidpipe <command> [overrides...]

commands:
  train   train a network (hydra overrides, e.g. model=simplecnn data=mnist pipeline.stages=2)
  bench   SID vs GPipe vs 1F1B throughput / time to accuracy (bench.* overrides)
  export  RUN_DIR|CHECKPOINT_DIR OUT.pt: one state_dict of the whole network
  eval    MODEL.pt [key=value ...]: test accuracy of an exported model, per depth
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not ("=" in argv[0] or argv[0].startswith("-")) else "train"
    if command in ("-h", "--help", "help"):
        print(USAGE)
        return
    # hydra reads sys.argv itself: hand it the overrides only.
    sys.argv = [f"sidpipe {command}", *argv]
    if command == "train":
        from sidpipe.train import main as train_main

        train_main()
    elif command in ("export", "eval"):
        from sidpipe.export import main as export_main

        export_main(command, argv)
    elif command == "bench":
        from sidpipe.bench import main as bench_main

        bench_main()
    else:
        print(f"sidpipe: error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
