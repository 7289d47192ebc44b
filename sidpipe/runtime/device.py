"""Where a process computes: its device, its torch threads, its CPU cores."""

from __future__ import annotations

import os

import torch

from sidpipe.config import Config
from sidpipe.errors import TrainingError


def select_device(cfg: Config, local_rank: int = 0) -> torch.device:
    want = cfg.device.value
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            "device=cuda was asked for but CUDA is not available; use device=cpu or auto"
        )
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def check_cores(cfg: Config, local_stages: int) -> None:
    """pipeline.cpu_affinity gives each stage on this node its own pipeline.threads cores:
    refuse a layout that would have to share them (it would silently oversubscribe)."""
    if not (cfg.pipeline.cpu_affinity and hasattr(os, "sched_getaffinity")):
        return
    have, need = len(os.sched_getaffinity(0)), local_stages * cfg.pipeline.threads
    if need > have:
        raise TrainingError(
            f"pipeline.cpu_affinity=true gives each of {local_stages} stage(s) on this node its "
            f"own pipeline.threads={cfg.pipeline.threads} core(s): {need} cores, but this "
            f"process may use {have}; lower pipeline.threads or the stages per node, or set "
            "pipeline.cpu_affinity=false"
        )



def set_threads(cfg: Config, local_rank: int) -> set[int] | None:
    """Threads per stage, and optionally one disjoint set of cores per stage process.

    Returns the previous CPU affinity when it changed it: a process that goes on to spawn
    pipeline stages (the bench's sequential reference) must restore it, since children
    inherit the mask.
    """
    n = cfg.pipeline.threads
    previous = None
    if cfg.pipeline.cpu_affinity and hasattr(os, "sched_setaffinity"):
        previous = os.sched_getaffinity(0)
        cores = sorted(previous)
        check_cores(cfg, local_rank + 1)
        os.sched_setaffinity(0, cores[local_rank * n : (local_rank + 1) * n])
    torch.set_num_threads(n)
    return previous

