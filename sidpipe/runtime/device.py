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


def stage_threads(cfg: Config, local_stages: int) -> int:
    """pipeline.threads as a number: N as given; auto = the cores this process may use,
    shared among the `local_stages` stage processes on this machine (at least 1 each), so a
    single process trains on every core and S stages do not oversubscribe them."""
    if cfg.pipeline.threads != "auto":
        return int(cfg.pipeline.threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_stages))


def local_stage_count(cfg: Config) -> int:
    """Stage processes on this machine: torchrun's LOCAL_WORLD_SIZE, else all of them (a
    pipeline sidpipe spawns itself runs on one machine)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", cfg.pipeline.stages))


def check_cores(cfg: Config, local_stages: int) -> None:
    """pipeline.cpu_affinity gives each stage on this node its own pipeline.threads cores:
    refuse a layout that would have to share them (it would silently oversubscribe)."""
    if not (cfg.pipeline.cpu_affinity and hasattr(os, "sched_getaffinity")):
        return
    threads = stage_threads(cfg, local_stages)
    have, need = len(os.sched_getaffinity(0)), local_stages * threads
    if need > have:
        raise TrainingError(
            f"pipeline.cpu_affinity=true gives each of {local_stages} stage(s) on this node its "
            f"own pipeline.threads={threads} core(s): {need} cores, but this "
            f"process may use {have}; lower pipeline.threads or the stages per node, or set "
            "pipeline.cpu_affinity=false"
        )


def set_threads(cfg: Config, local_rank: int, local_stages: int = 1) -> set[int] | None:
    """Threads per stage, and optionally one disjoint set of cores per stage process
    (`local_stages`: the stage processes on this machine, which share its cores).

    Returns the previous CPU affinity when it changed it: a process that goes on to spawn
    pipeline stages (the bench's sequential reference) must restore it, since children
    inherit the mask.
    """
    n = stage_threads(cfg, local_stages)
    previous = None
    if cfg.pipeline.cpu_affinity and hasattr(os, "sched_setaffinity"):
        previous = os.sched_getaffinity(0)
        cores = sorted(previous)
        check_cores(cfg, max(local_rank + 1, local_stages))
        os.sched_setaffinity(0, cores[local_rank * n : (local_rank + 1) * n])
    torch.set_num_threads(n)
    return previous
