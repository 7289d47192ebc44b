"""Training checkpoints: every stage saves its own part with torch.distributed.checkpoint.

`CheckpointManager` is the one entry the drivers use (single-process, SID and BP runs):
`restore()` at start (resume=auto|PATH) and `save()` at a CHECKPOINT event.

Layout under `<run_dir>/checkpoints/` (or `checkpoint.dir`):

    step_00000040/            one directory per checkpointed step, complete or absent
      meta.json               step, stages, partition, method, and size + sha256 of every file
      stage0/ .metadata __0_0.distcp manifest.json
      stage1/ ...

A stage writes into `step_XXXXXXXX.tmp/stage{r}/`; the last stage to finish (a counter on
the rendezvous store: no collective, so no stage waits for another) writes meta.json and
renames the directory into place. A crash mid-save leaves only a `.tmp` directory, which
is never loaded; a complete directory whose files were damaged later fails its checksum and
`resume=auto` falls back to the previous good one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sidpipe.config import Config, to_dict
from sidpipe.errors import CheckpointError
from sidpipe.runtime.cadence import RunState
from sidpipe.runtime.io import atomic_write_json
from sidpipe.runtime.resume import (  # noqa: F401 - re-exported: one module for callers
    PREFIX,
    _sha256,
    check_compatible,
    checkpoint_root,
    latest_good,
    published,
    read_meta,
    resolve_resume,
    step_of,
    verify,
)

log = logging.getLogger("sidpipe.runtime.checkpoint")


def os_cause(e: BaseException) -> str:
    """The OS error behind a wrapped one ('No space left on device'), else its first line."""
    seen: list[BaseException] = [e]
    while seen:
        cur = seen.pop()
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror
        for nested in getattr(cur, "failures", {}).values():  # DCP's CheckpointException
            if isinstance(nested, BaseException):
                seen.append(nested)
            elif isinstance(nested, tuple) and nested and isinstance(nested[0], BaseException):
                seen.append(nested[0])
        seen += [c for c in (cur.__cause__, cur.__context__) if c is not None]
    for known in ("No space left on device", "Read-only file system", "Permission denied"):
        if known in str(e):
            return known
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _state(module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(module, optimizers)
    return {"model": model_sd, "optim": optim_sd}


def save(
    root: Path,
    step: int,
    stage: int,
    world: int,
    module: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    extra: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    store: Any = None,
) -> Path | None:
    """Save this stage's part of step `step`; the last stage to finish publishes it.
    A failed write (disk full, read-only) removes this stage's partial files and raises
    CheckpointError naming the path and the cause."""
    tmp = root / f"{PREFIX}{step:08d}.tmp"
    part = tmp / f"stage{stage}"
    try:
        part.mkdir(parents=True, exist_ok=True)
        state = _state(module, optimizers)
        state["extra"] = {"torch_rng": torch.get_rng_state(), "json": json.dumps(extra)}
        with warnings.catch_warnings():  # "assuming the intent is to save in one process": yes
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=part, no_dist=True)
        files = {str(f.relative_to(tmp)): [f.stat().st_size, _sha256(f)]
                 for f in sorted(part.iterdir())}  # fmt: skip
        atomic_write_json(part / "manifest.json", files)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException
        shutil.rmtree(part, ignore_errors=True)  # no partial part keeps the disk full
        raise CheckpointError(f"cannot write checkpoint {part}: {os_cause(e)}") from None
    done = store.add(f"sidpipe/ckpt/{root}/{step}", 1) if store is not None else world
    if done < world:
        return None
    # Last stage in: every part is on disk. Publish the step atomically.
    all_files: dict[str, Any] = {}
    for r in range(world):
        all_files.update(json.loads((tmp / f"stage{r}" / "manifest.json").read_text()))
    atomic_write_json(tmp / "meta.json", {**meta, "step": step, "files": all_files})
    final = root / f"{PREFIX}{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep_last)
    log.info("checkpoint %s written", final)
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = published(root)
    for old in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


# What a checkpoint's `.metadata` pickle may name: DCP's own metadata records, torch sizes,
# dtypes and layouts, and paths. torch 2.14's FileSystemReader reads it with plain
# pickle.load, which would run whatever a crafted file names (docs/design.md §8).
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {  # fmt: skip
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = getattr(torch, name, None) if module == "torch" else None
        if (module, name) in _METADATA_GLOBALS or isinstance(dtype, torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader, but the metadata is unpickled through an allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except Exception as e:  # noqa: BLE001 - any failure means: not a checkpoint we wrote
                raise CheckpointError(
                    f"checkpoint {self.path}: unreadable or unsafe metadata ({e})"
                ) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"checkpoint {self.path}: metadata is not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyperparameters, the run state's JSON) are read with
    `weights_only=True`: plain containers and numbers only, never arbitrary objects."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unsafe or damaged entry
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn}: {e}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _check_shapes(metadata: Metadata, model: dict[str, Any], path: Path) -> None:
    saved = metadata.state_dict_metadata
    hint = "resume with the model.* settings of the run that wrote it"
    for name, value in model.items():
        entry = saved.get(f"model.{name}")
        if entry is None:
            raise CheckpointError(f"checkpoint {path} has no parameter {name}: it was written "
                                  f"for another model; {hint}")  # fmt: skip
        size = getattr(entry, "size", None)
        if isinstance(value, torch.Tensor) and size is not None and tuple(size) != value.shape:
            raise CheckpointError(
                f"checkpoint {path}: parameter {name} is {list(size)} there but "
                f"{list(value.shape)} in this run's model; {hint}"
            )


def load(
    path: Path, stage: int, module: nn.Module, optimizers: list[torch.optim.Optimizer]
) -> dict[str, Any]:
    """Load this stage's part into module and optimizers; returns the saved `extra` dict.
    Nothing in the files can run code: see SafeReader and SafeLoadPlanner."""
    state = _state(module, optimizers)
    state["extra"] = {"torch_rng": torch.get_rng_state(), "json": ""}
    part = path / f"stage{stage}"
    # refuse an unsafe file or another model's parameters here, in one line naming what
    # differs (dcp would raise a CheckpointException listing only the ranks that failed)
    _check_shapes(SafeReader(part).read_metadata(), state["model"], path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=SafeReader(part), planner=SafeLoadPlanner(),
                 no_dist=True)  # fmt: skip
    set_state_dict(
        module, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    torch.set_rng_state(state["extra"]["torch_rng"])
    return json.loads(state["extra"]["json"])


class CheckpointManager:
    """Save, verify, keep_last and resume for one stage (rank) of a run of `world` stages.

    partition: the blocks of every stage ([[start, stop], ...]); a checkpoint written with
    another stage count, method or partition is refused on resume.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        partition: list[list[int]],
        rank: int = 0,
        world: int = 1,
        store: Any = None,
    ):
        self.cfg, self.rank, self.world, self.store = cfg, rank, world, store
        self.root = checkpoint_root(cfg, run_dir)
        self.run_dir = run_dir
        self.meta = {"stages": world, "method": cfg.method.value, "partition": partition,
                     "config": to_dict(cfg)}  # fmt: skip

    def restore(
        self, module: nn.Module, optimizers: list[torch.optim.Optimizer], schedulers: list[Any]
    ) -> tuple[RunState, Path] | None:
        """With resume= set: load this stage's part of the checkpoint; None for a fresh start."""
        path = resolve_resume(self.cfg, self.run_dir)  # verified there: read, don't re-hash
        if path is None:
            return None
        check_compatible(read_meta(path), self.cfg, self.meta["partition"], path)
        extra = load(path, self.rank, module, optimizers)
        return RunState.from_json(extra, schedulers), path

    def save(
        self,
        state: RunState,
        module: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        schedulers: list[Any],
    ) -> Path | None:
        """This stage's part of step state.step; the last stage to finish publishes it."""
        return save(
            self.root, state.step, self.rank, self.world, module, optimizers,
            state.to_json(schedulers), self.meta, self.cfg.checkpoint.keep_last, self.store,
        )  # fmt: skip
