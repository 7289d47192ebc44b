"""Which checkpoint a run resumes from: the on-disk layout, its checksums, and the checks.

Split from `checkpoint.py` (which writes and reads the state with torch.distributed.checkpoint)
so that the launcher can find, verify and refuse a checkpoint before any stage starts without
importing DCP and the DTensor machinery behind it (about a second of start-up per run).
The layout is described in `checkpoint.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from sidpipe.config import Config
from sidpipe.errors import CheckpointError

log = logging.getLogger("sidpipe.runtime.checkpoint")
PREFIX = "step_"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_of(path: Path) -> int:
    """The training step a checkpoint directory (step_XXXXXXXX) holds."""
    return int(path.name[len(PREFIX) :])


def published(root: Path) -> list[Path]:
    """The checkpoint directories under root (step_ + 8 digits), oldest first; anything else
    there (a .tmp of a save in progress, a user's backup copy, a stray file) is not one."""
    if not root.is_dir():
        return []
    names = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and len(p.name) == len(PREFIX) + 8 and p.name[len(PREFIX):].isdigit()]  # fmt: skip
    return sorted(names, key=step_of)


def drop_partial(root: Path) -> None:
    """Remove step_N.tmp directories: the parts of a checkpoint that some stage never
    finished (a full disk, a killed run). Never resumable; they would only fill the disk.
    Called by whoever holds the run directory's lock, when no stage is running."""
    if root.is_dir():
        for p in root.glob(f"{PREFIX}*.tmp"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def checkpoint_root(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"


def verify(path: Path) -> dict[str, Any]:
    """meta.json of a complete, undamaged checkpoint; CheckpointError otherwise."""
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
        files = {str(rel): (int(size), str(digest))
                 for rel, (size, digest) in meta["files"].items()}  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: unreadable meta.json ({e})") from None
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: meta.json {problem}")
    for rel, (size, digest) in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"checkpoint {path}: meta.json names {rel}, outside it")
        f = path / rel
        if not f.exists() or f.stat().st_size != size or _sha256(f) != digest:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {rel} does not match its checksum"
            )
    return meta


def _meta_problem(meta: dict[str, Any]) -> str:
    """What is wrong with a meta.json's layout fields ('' if nothing): they decide whether a
    run may resume from it, so they are checked before use, not trusted."""
    stages, method, partition = meta.get("stages"), meta.get("method"), meta.get("partition")
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        return f"has no stage count ('stages': {stages!r})"
    if not isinstance(method, str):
        return f"has no method ('method': {method!r})"
    pairs = isinstance(partition, list) and all(
        isinstance(p, list) and len(p) == 2 and all(type(i) is int for i in p) for p in partition
    )
    if (
        not pairs
        or not partition
        or partition[0][0] != 0
        or any(a >= b or (i and partition[i - 1][1] != a) for i, (a, b) in enumerate(partition))
    ):
        return f"has no valid partition ('partition': {str(partition)[:80]})"
    if not isinstance(meta.get("config"), dict):
        return "has no run config ('config')"
    return ""


def latest_good(root: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    for path in reversed(published(root)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log.warning("%s; falling back to an earlier checkpoint", e)
    return None


def resolve_resume(cfg: Config, run_dir: Path) -> Path | None:
    """`resume=auto`: the newest good checkpoint (or a fresh start); `resume=PATH`: that one."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return latest_good(checkpoint_root(cfg, run_dir))
    path = Path(cfg.resume)
    if not path.exists():
        raise CheckpointError(f"resume={path} does not exist")
    if path.name.startswith(PREFIX):
        verify(path)
        return path
    found = latest_good(path if path.name == "checkpoints" else path / "checkpoints")
    if found is None:
        raise CheckpointError(f"resume={path}: no complete, undamaged checkpoint found there")
    return found


def check_compatible(
    meta: dict[str, Any], cfg: Config, partition: list[list[int]] | None, path: Path
) -> None:
    """Same method, stage count and cuts, or a clear refusal (re-partitioning is not done).
    partition=None checks method and stage count only (the launcher, before any stage
    process starts and before the model is cut)."""
    want = (cfg.pipeline.stages, cfg.method.value, partition)
    have = (meta["stages"], meta["method"], meta["partition"] if partition is not None else None)
    if have != want:
        blocks = "" if partition is None else f" (blocks {partition})"
        raise CheckpointError(
            f"checkpoint {path} was written by a {meta['stages']}-stage {meta['method']} run "
            f"(blocks per stage {meta['partition']}); resuming with pipeline.stages="
            f"{cfg.pipeline.stages} method={cfg.method.value}{blocks} is not "
            "supported: resume with the same layout, or export the model and start a new run"
        )


def check_not_past(path: Path, step: int, n_steps: int) -> None:
    """A checkpoint past the end of the run being resumed (train.max_steps or train.epochs
    lowered since) leaves nothing to train: refused, rather than a run that trains nothing."""
    if step > n_steps:
        raise CheckpointError(
            f"{path} is at step {step}, past the {n_steps} steps this run trains "
            "(train.epochs, train.max_steps): raise them to train further, or give a new run "
            "its own hydra.run.dir"
        )


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint that resolve_resume or verify has already checked."""
    return json.loads((path / "meta.json").read_text())
