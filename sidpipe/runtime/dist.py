"""Process group, device placement and the control plane of a pipeline run.

The control plane is the rendezvous TCPStore torchrun (or our self-spawn) already runs: a
stage that fails writes one line there before exiting, so every peer and the launcher can
say *which* stage failed, at which step, and why. No socket of our own is opened.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from sidpipe.config import Config, Transport
from sidpipe.errors import TrainingError
from sidpipe.runtime.device import check_cores, select_device, set_threads

ERROR_KEY = "sidpipe/error"


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ
    )


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    staged: bool  # CUDA tensors travel through pinned host memory over gloo
    store: dist.Store

    @property
    def tag(self) -> str:
        return f"[stage {self.rank}]"

    def report_failure(self, message: str, run_dir: Path) -> None:
        """Print the failure, publish it to peers, and keep the first one in run_dir/failure.txt."""
        line = f"{self.tag} {message}"
        print(f"sidpipe: error: {line}", file=sys.stderr, flush=True)
        try:
            self.store.compare_set(ERROR_KEY, "", line)
        except Exception:  # the store may be gone already (launcher tearing down)
            pass
        path = run_dir / "failure.txt"
        try:  # O_EXCL: the first failure wins, later ones (peers stopping) don't overwrite it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            return
        try:
            with os.fdopen(fd, "w") as f:
                f.write(line + "\n")
        except OSError:  # a full disk: no empty failure.txt that says nothing
            path.unlink(missing_ok=True)

    def peer_failure(self) -> str | None:
        """The failure another stage published, if any (cheap: one store round trip)."""
        try:
            if self.store.check([ERROR_KEY]):
                return self.store.get(ERROR_KEY).decode()
        except Exception:
            return None
        return None


def init_distributed(cfg: Config) -> DistContext:
    """Join the process group from torchrun's environment, with the pipeline's timeout."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world != cfg.pipeline.stages:
        raise TrainingError(
            f"world size {world} != pipeline.stages={cfg.pipeline.stages}: "
            "launch one process per stage "
            f"(torchrun --nproc-per-node {cfg.pipeline.stages}) or set pipeline.stages={world}"
        )
    check_cores(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world)))  # every rank, same verdict
    set_threads(cfg, local_rank)
    device = select_device(cfg, local_rank)
    transport = cfg.pipeline.transport
    if transport is Transport.auto:
        # NCCL refuses two ranks on one GPU: with fewer GPUs than local stages, stage through
        # pinned host memory over gloo instead.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        enough_gpus = device.type == "cuda" and torch.cuda.device_count() >= local_world
        transport = Transport.nccl if enough_gpus else Transport.gloo
    if transport is Transport.nccl and device.type != "cuda":
        raise TrainingError("pipeline.transport=nccl needs CUDA devices; use gloo or device=cuda")
    staged = device.type == "cuda" and transport in (Transport.gloo, Transport.staged)
    backend = "nccl" if transport is Transport.nccl else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=cfg.pipeline.timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=timeout,
    )
    return DistContext(rank, world, local_rank, device, backend, staged, store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
