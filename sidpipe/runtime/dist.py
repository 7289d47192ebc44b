"""Process group, device placement and the control plane of a pipeline run.

The control plane is the rendezvous TCPStore torchrun (or our self-spawn) already runs: a
stage that fails writes one line there before exiting, so every peer and the launcher can
say *which* stage failed, at which step, and why. No socket of our own is opened.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from sidpipe.config import Config, TransportBackend
from sidpipe.errors import TrainingError
from sidpipe.runtime.device import check_cores, select_device, set_threads

ERROR_KEY = "sidpipe/error"
HEARTBEAT_KEY = "sidpipe/heartbeat"
HEARTBEAT_S = 1.0


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
    _heartbeat: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def tag(self) -> str:
        return f"[stage {self.rank}]"

    def report_failure(self, message: str, run_dir: Path) -> None:
        """Print the failure, publish it to peers, and keep the first one in run_dir/failure.txt."""
        line = f"{self.tag} {message}"
        print(f"sidpipe: error: {line}", file=sys.stderr, flush=True)
        # the file before the store: a peer that stops because it read this line from the
        # store must find failure.txt already taken, or its "stopping: ..." line wins the
        # file and the launcher's headline names the wrong stage
        write_failure(run_dir, line)
        try:
            self.store.compare_set(ERROR_KEY, "", line)
        except Exception:  # the store may be gone already (launcher tearing down)
            pass

    def start_heartbeat(self, store: dist.Store) -> None:
        """A daemon thread stamps this stage's clock on the control plane every HEARTBEAT_S,
        on its own store connection. It keeps beating while the main thread waits inside a
        p2p op and stops with the process (killed, or frozen by SIGSTOP) or at
        `stop_heartbeat`, so a stage that times out can name the peer that went silent
        instead of blaming its neighbour."""
        key = f"{HEARTBEAT_KEY}/{self.rank}"
        me = f"{socket.gethostname()} {os.getpid()}"

        def beat() -> None:
            while not self._stop.is_set():
                try:
                    store.set(key, f"{time.time()} {me}")
                except Exception:  # the store is gone: the run is ending
                    return
                self._stop.wait(HEARTBEAT_S)

        self._heartbeat = threading.Thread(target=beat, name="sidpipe-heartbeat", daemon=True)
        self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        """Before a clean exit: a daemon thread still inside a store call while the
        interpreter shuts down can abort the process ("terminate called without an active
        exception", SIGABRT after the run had finished, seen under heavy CPU load)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5 * HEARTBEAT_S)

    def silent_peers(self) -> list[tuple[int, float, str, int]]:
        """(rank, seconds since its last heartbeat, host, pid) of every peer silent for more
        than 5 heartbeats."""
        out = []
        now = time.time()
        for r in range(self.world):
            key = f"{HEARTBEAT_KEY}/{r}"
            try:
                if r == self.rank or not self.store.check([key]):
                    continue
                stamp, host, pid = self.store.get(key).decode().split()
            except Exception:  # noqa: BLE001 - no control plane: nothing to say
                return out
            if now - float(stamp) > 5 * HEARTBEAT_S:
                out.append((r, now - float(stamp), host, int(pid)))
        return out

    def peer_failure(self) -> str | None:
        """The failure another stage published, if any (cheap: one store round trip)."""
        try:
            if self.store.check([ERROR_KEY]):
                return self.store.get(ERROR_KEY).decode()
        except Exception:
            return None
        return None


def check_transport(cfg: Config, device: torch.device) -> None:
    """NCCL moves CUDA tensors only: refused on a CPU stage (by the launcher, before any
    stage starts, and by each stage under torchrun)."""
    if cfg.pipeline.transport is TransportBackend.nccl and device.type != "cuda":
        raise TrainingError(
            f"pipeline.transport=nccl needs CUDA devices, and this stage runs on {device.type} "
            "(no GPU found, or device=cpu): use pipeline.transport=auto or gloo"
        )


FAILURE_DIR_ENV = "SIDPIPE_FAILURE_DIR"  # the launcher's fallback, for a run dir that is full


def write_failure(run_dir: Path, line: str) -> None:
    """Keep the first failure's line in run_dir/failure.txt (O_EXCL: the first one wins;
    peers that stop because of it do not overwrite it), written whole or not at all. Where
    the run directory cannot take it (a full disk: often the failure itself), the line goes
    to the launcher's own directory ($SIDPIPE_FAILURE_DIR), so the launcher can still say it."""
    places = [run_dir] + ([Path(os.environ[FAILURE_DIR_ENV])] if FAILURE_DIR_ENV in os.environ
                          else [])  # fmt: skip
    for place in places:
        path = place / "failure.txt"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return  # another stage's failure came first
        except OSError:
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(line + "\n")
            return
        except OSError:  # a full disk: no empty failure.txt that says nothing
            path.unlink(missing_ok=True)


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
    local_stages = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    check_cores(cfg, local_stages)  # every rank, same verdict
    set_threads(cfg, local_rank, local_stages)
    device = select_device(cfg, local_rank)
    transport = cfg.pipeline.transport
    if transport is TransportBackend.auto:
        # NCCL refuses two ranks on one GPU: with fewer GPUs than local stages, stage through
        # pinned host memory over gloo instead.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        enough_gpus = device.type == "cuda" and torch.cuda.device_count() >= local_world
        transport = TransportBackend.nccl if enough_gpus else TransportBackend.gloo
    check_transport(cfg, device)
    staged = device.type == "cuda" and transport in (TransportBackend.gloo, TransportBackend.staged)
    backend = "nccl" if transport is TransportBackend.nccl else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=cfg.pipeline.timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    # The agent keeps its store across restarts of the stages: every attempt gets its own
    # keys (the process group's addresses, the failure line, heartbeats, checkpoint
    # counters), or a restarted stage would connect to a died one's port, read the died
    # attempt's failure, or count its checkpoint parts.
    prefix = f"sidpipe/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"

    def connect() -> dist.Store:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False, timeout=timeout)  # fmt: skip
        return dist.PrefixStore(prefix, store)

    dist.init_process_group(backend, store=dist.PrefixStore("pg", connect()), rank=rank,
                            world_size=world, timeout=timeout, **kwargs)  # fmt: skip
    ctx = DistContext(rank, world, local_rank, device, backend, staged, connect())
    ctx.start_heartbeat(connect())
    return ctx


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
