"""`sidpipe export SOURCE OUT.pt` and `sidpipe eval OUT.pt [overrides]`.

Export merges every stage's parameters into one ordinary state_dict of the whole network
(blocks + heads), loadable into the single-process model for plain feed-forward inference.
SOURCE is a run directory (its `model/stage*.pt`) or a checkpoint directory (`step_*`). The
run's config travels beside it as OUT.pt.json, so `sidpipe eval` can rebuild the network.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sidpipe.config import Config, Method
from sidpipe.data import eval_splits, load_data
from sidpipe.errors import ConfigError, DataError, fail
from sidpipe.method.step import evaluate, make_method
from sidpipe.models import BlockNet, build_net
from sidpipe.models.partition import StageModule
from sidpipe.runtime import checkpoint
from sidpipe.runtime.device import select_device
from sidpipe.runtime.io import atomic_write_json, load_state


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    merged = OmegaConf.merge(
        OmegaConf.structured(Config), raw, OmegaConf.from_dotlist(overrides or [])
    )
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    return cfg


def _from_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:

    meta = checkpoint.verify(path)
    cfg = config_from_dict(meta["config"])
    net = build_net(cfg, load_data(cfg.data, cfg.seed))
    for r, (a, b) in enumerate(meta["partition"]):
        # each stage saved the module it trained: a slice of blocks (SID) or the whole net
        whole = meta["stages"] == 1 and (cfg.method is Method.bp or not isinstance(net, BlockNet))
        part = net if whole else StageModule(net, range(a, b))
        checkpoint.load(path, r, part, [])
    return net.state_dict(), meta["config"]


def export_model(source: str | Path, out: str | Path) -> Path:
    source, out = Path(source), Path(out)
    if source.name.startswith(checkpoint.PREFIX):
        state, raw_cfg = _from_checkpoint(source)
    elif (source / "model").is_dir() and (source / "summary.json").exists():
        state = load_state(source)
        raw_cfg = json.loads((source / "summary.json").read_text())["config"]
    else:
        raise ConfigError(f"{source} is neither a finished run directory nor a checkpoint (step_*)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    atomic_write_json(out.with_name(out.name + ".json"), {"config": raw_cfg})
    return out


def evaluate_model(model_path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Plain single-process inference of an exported model on the test split."""

    model_path = Path(model_path)
    raw = json.loads(model_path.with_name(model_path.name + ".json").read_text())["config"]
    cfg = config_from_dict(raw, overrides)
    device = select_device(cfg)
    data = load_data(cfg.data, cfg.seed)
    net = build_net(cfg, data)
    net.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    method = make_method(cfg, net, 1, device)
    per_depth = evaluate(method, eval_splits(cfg, data)["test"], device)
    return {"model": str(model_path), "data": cfg.data.name, "test_accuracy": per_depth[-1],
            "per_depth_accuracy": per_depth}  # fmt: skip


USAGE = {
    "export": "usage: sidpipe export RUN_DIR|CHECKPOINT_DIR OUT.pt\n\n"
    "Merge a run's (or a checkpoint's) stage parameters into one state_dict OUT.pt, with the\n"
    "run's config beside it in OUT.pt.json.",
    "eval": "usage: sidpipe eval MODEL.pt [key=value ...]\n\n"
    "Test accuracy of an exported model at every depth, single process; the overrides are\n"
    "train's (e.g. data.root=DIR).",
}


def main(command: str, argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE[command])
        return
    try:
        if command == "export":
            if len(argv) != 2:
                fail(USAGE["export"].splitlines()[0], 2)
            print(f"exported {export_model(argv[0], argv[1])}")
        else:
            if not argv:
                fail(USAGE["eval"].splitlines()[0], 2)
            print(json.dumps(evaluate_model(argv[0], argv[1:]), indent=2))
    except (ConfigError, DataError, FileNotFoundError) as e:
        fail(str(e).splitlines()[0])
    sys.stdout.flush()
