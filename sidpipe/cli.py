"""`sidpipe <command> [hydra overrides]`: train, bench, accuracy, export, eval, generate.

The commands are imported lazily, one per call: `sidpipe export` need not pay for hydra,
matplotlib or the pipeline drivers.
"""

from __future__ import annotations

import sys

USAGE = """usage: sidpipe <command> [overrides...]

commands:
  train     train a network (hydra overrides, e.g. model=simplecnn data=mnist pipeline.stages=2)
  bench     SID vs the BP pipeline schedules: throughput / time to accuracy / simulate
  accuracy  the accuracy studies (study.name=reference|blockwise|noise|alpha|depth|all)
  export    RUN_DIR|CHECKPOINT_DIR OUT.pt: one state_dict of the whole network
  eval      MODEL.pt [key=value ...]: test accuracy (bits/byte) of an exported model, per
            depth and with early exit
  generate  MODEL.pt [--prompt TEXT] [--depth D | --threshold P]: sample from a language model

`sidpipe <command> --help` shows the command's own help."""

COMMANDS = ("train", "bench", "accuracy", "export", "eval", "generate")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command = argv.pop(0)
    if command not in COMMANDS:
        hint = " (overrides go after a command: sidpipe train key=value)" if "=" in command else ""
        print(f"sidpipe: error: unknown command {command!r}{hint}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    # hydra reads sys.argv itself: hand it the overrides only.
    sys.argv = [f"sidpipe {command}", *argv]
    if command == "train":
        from sidpipe.train import main as train_main

        train_main()
    elif command == "export":
        from sidpipe.export import main as export_main

        export_main(argv)
    elif command in ("eval", "generate"):
        from sidpipe.inference import main as inference_main

        inference_main(command, argv)
    elif command == "bench":
        from sidpipe.bench.throughput import main as bench_main

        bench_main()
    else:
        from sidpipe.bench.accuracy import main as accuracy_main

        sys.exit(accuracy_main(argv))


if __name__ == "__main__":
    main()
