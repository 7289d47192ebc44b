"""`sidpipe export SOURCE OUT.pt`: every stage's parameters merged into one ordinary
state_dict of the whole network (blocks + heads), loadable into the single-process model for
plain feed-forward inference (`sidpipe eval`, `generate`: inference.py). SOURCE is a run
directory (its `model/stage*.pt`) or a checkpoint directory (`step_*`). The run's config
travels beside it as OUT.pt.json (and a BPE run's tokenizer as OUT.pt.tokenizer.json), so
eval can rebuild the network; export never overwrites a file that is not an earlier export.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import torch

from sidpipe.config import Method
from sidpipe.errors import CheckpointError, ConfigError, OneLineParser, SidpipeError, fail
from sidpipe.models import BlockNet, build_net
from sidpipe.models.partition import Stage
from sidpipe.runtime import checkpoint
from sidpipe.runtime.io import atomic_write_json, write_torch
from sidpipe.saved import (
    TRUST_HELP,
    Shapes,
    check_saved,
    compose_for_eval,
    first_line,
    read_json,
    read_state,
)
from sidpipe.tokenizer import TextTokenizer, load_bpe, write_atomic


def _from_checkpoint(
    path: Path, trust: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = checkpoint.verify(path)
    cfg = compose_for_eval(meta.get("config"), [], path / "meta.json", trust)
    net = build_net(cfg, Shapes(cfg))  # type: ignore[arg-type]
    for r, (a, b) in enumerate(meta["partition"]):
        # each stage saved the module it trained: a slice of blocks (SID) or the whole net
        whole = meta["stages"] == 1 and (cfg.method is Method.bp or not isinstance(net, BlockNet))
        part = net if whole else Stage(net, range(a, b))
        checkpoint.load(path, r, part, [])
    return net.state_dict(), meta["config"]


def _from_run(source: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every stage's model/stage{r}.pt, each read weights-only and named when it fails."""
    summary = read_json(source / "summary.json")
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise CheckpointError(f"{source / 'summary.json'} has no run config ('config')")
    check_saved(summary["config"], source / "summary.json")
    parts = sorted((source / "model").glob("stage*.pt"))
    if not parts:
        raise CheckpointError(f"{source / 'model'} holds no stage*.pt: the run saved no model")
    stages = summary["config"].get("pipeline", {}).get("stages", 1)
    want = [source / "model" / f"stage{r}.pt" for r in range(stages)]  # one file per rank
    missing = [p.name for p in want if p not in parts]
    if missing:
        raise CheckpointError(
            f"{source / 'model'} lacks {', '.join(missing)} of the run's {stages} stages: "
            "exporting it would give a partial model"
        )
    parts = want
    state: dict[str, torch.Tensor] = {}
    for p in parts:
        state.update(read_state(p))
    return state, summary["config"]


def check_out(out: Path) -> None:
    """Export writes OUT and OUT.json and replaces an earlier export there, never another
    file: `sidpipe export RUN RUN/summary.json` would otherwise overwrite the run's results."""
    side = out.with_name(out.name + ".json")
    if out.is_dir():
        raise ConfigError(f"cannot write {out}: it is a directory (give OUT.pt, a file name)")
    earlier_export = out.is_file() and side.is_file()
    for path in (out, side):
        if path.exists() and not earlier_export:
            raise ConfigError(
                f"{path} exists and is not an earlier export (a model file with its .json "
                "beside it): refusing to overwrite it; choose another OUT.pt"
            )


def _run_tokenizer(source: Path, raw_cfg: dict[str, Any]) -> TextTokenizer | None:
    """The BPE a run trained with: the copy its run directory keeps (a checkpoint's run
    directory is two levels up in the default layout), or the file its config named; checked
    against the config's data.tokenizer_sha256 when the run recorded one."""
    data = raw_cfg.get("data") if isinstance(raw_cfg.get("data"), dict) else {}
    if data.get("tokenizer") != "bpe":
        return None
    run = source.parent.parent if source.name.startswith(checkpoint.PREFIX) else source
    candidates = [run / "tokenizer.json"]
    if data.get("tokenizer_path"):
        candidates.append(Path(data["tokenizer_path"]))
    for path in candidates:
        if path.is_file():
            return load_bpe(path, data.get("tokenizer_sha256"), int(data["vocab_size"]))
    raise CheckpointError(
        f"{source} was trained with data.tokenizer=bpe but its tokenizer is not at "
        f"{candidates[0]}: export needs it to carry it beside the model"
    )


def export_model(source: str | Path, out: str | Path, trust: str | None = None) -> Path:
    source, out = Path(source), Path(out)
    if not source.exists():
        raise ConfigError(f"{source} not found: give a finished run directory or a checkpoint")
    if source.name.startswith(checkpoint.PREFIX) and source.is_dir():
        state, raw_cfg = _from_checkpoint(source, trust)
    elif (source / "model").is_dir() and (source / "summary.json").exists():
        state, raw_cfg = _from_run(source)
    else:
        raise ConfigError(f"{source} is neither a finished run directory nor a checkpoint (step_*)")
    check_out(out)
    tok = _run_tokenizer(source, raw_cfg)
    sidecar: dict[str, Any] = {"config": raw_cfg}
    side = out.with_name(out.name + ".json")
    tok_path = out.with_name(out.name + ".tokenizer.json")
    new = [out.with_name(f".{out.name}.new"), side.with_name(f".{side.name}.new"),
           tok_path.with_name(f".{tok_path.name}.new")]  # fmt: skip
    try:  # every file written aside, then renamed: a failure leaves no model without config
        out.parent.mkdir(parents=True, exist_ok=True)
        write_torch(new[0], state)
        if tok is not None:  # beside OUT.pt, as the config is; eval/generate check its hash
            assert tok.text is not None
            write_atomic(new[2], tok.text)
            sidecar["tokenizer"] = {"file": tok_path.name, "sha256": tok.sha256}
        atomic_write_json(new[1], sidecar)
        os.replace(new[0], out)
        if tok is not None:
            os.replace(new[2], tok_path)
        os.replace(new[1], side)
    except OSError as e:
        for f in new:
            with contextlib.suppress(OSError):  # e.g. OUT under a file: nothing was written
                f.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {out}: {e.strerror or first_line(e)}") from None
    return out


def main(argv: list[str]) -> None:
    ap = OneLineParser(prog="sidpipe export", description="Merge a run's (or a checkpoint's) "
                       "stage parameters into one state_dict OUT.pt, with the run's config "
                       "beside it in OUT.pt.json (and a BPE run's tokenizer in "
                       "OUT.pt.tokenizer.json).")  # fmt: skip
    ap.add_argument("source", metavar="RUN_DIR|CHECKPOINT_DIR")
    ap.add_argument("out", metavar="OUT.pt")
    ap.add_argument("--trust-target", metavar="TARGET", help=TRUST_HELP)
    if any(a in ("-h", "--help") for a in argv):
        ap.print_help()
        return
    args = ap.parse_intermixed_args(argv)
    try:
        print(f"exported {export_model(args.source, args.out, args.trust_target)}")
    except SidpipeError as e:
        fail(str(e).splitlines()[0], getattr(e, "exit_code", 1))
    except KeyboardInterrupt:
        fail("interrupted by SIGINT", 130)
    sys.stdout.flush()
