"""Start a pipeline run: join torchrun's process group, or spawn one process per stage.

Started plainly, `sidpipe train pipeline.stages=S` spawns S local processes through torch's
own elastic launcher (the engine behind torchrun): it gives the rendezvous store, watches
the workers and, when one fails or is killed, stops the others, so no peer is left hanging.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from sidpipe.config import Config, Method
from sidpipe.data import load_data
from sidpipe.drivers.summary import gather_and_write
from sidpipe.errors import Interrupted, TrainingError
from sidpipe.method.stage import check_graph_device
from sidpipe.models import build_net
from sidpipe.models.partition import partition_blocks
from sidpipe.runtime.device import check_cores, select_device
from sidpipe.runtime.dist import init_distributed, shutdown, under_torchrun

RUN_DIR_KEY = "sidpipe/run_dir"
CUTS_KEY = "sidpipe/partition"
LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
FAILURE_FILE = "failure.txt"  # the first failing stage's one-line reason
FAULT_FILE = "stage{rank}.fault.txt"  # a stage's Python stacks if a signal (SIGABRT...) kills it


if TYPE_CHECKING:
    from sidpipe.drivers.runner import StageRunner

# pipeline.partition=auto: measures the blocks and returns the config with concrete cuts
# (bench/balance.py); called once, in the launcher or on rank 0 under torchrun.
Planner = Callable[[Config, Path, int], Config]


def check_layout(cfg: Config) -> None:
    """Fail before any process starts: data present, stages fit the model, cuts valid."""
    check_cores(cfg, cfg.pipeline.stages)
    data = load_data(cfg.data, cfg.seed)
    net = build_net(cfg, data)
    if cfg.method is Method.bp:
        from sidpipe.drivers.bp import check_bp_layout  # torch pipelining: BP runs only

        check_bp_layout(cfg, data, net)
    try:
        partition_blocks(net.n_blocks, cfg.stage_count, cfg.pipeline.partition)
    except ValueError as e:
        raise TrainingError(str(e)) from None


def stage_main(cfg: Config, run_dir: str, planner: Planner | None = None) -> dict[str, Any]:
    """One stage process. Returns the summary on rank 0, {} elsewhere; exits non-zero on failure."""
    ctx = init_distributed(cfg)
    # Every rank must write into one run directory: rank 0's is the one.
    if ctx.rank == 0:
        ctx.store.set(RUN_DIR_KEY, run_dir)
    else:
        run_dir = ctx.store.get(RUN_DIR_KEY).decode()
    # A native crash (an abort in a C++ thread, a segfault) leaves no Python exception to
    # report: faulthandler writes every thread's Python stack to this file instead, and the
    # launcher names its innermost frame (the file is removed again on a clean exit).
    fault_path = Path(run_dir) / FAULT_FILE.format(rank=ctx.rank)
    try:
        fault_file = open(fault_path, "w")  # noqa: SIM115 - open for the life of the process
        faulthandler.enable(fault_file, all_threads=True)
    except OSError:  # an unwritable directory is reported where the run first writes to it
        fault_file = None
    if cfg.pipeline.partition == "auto":  # under torchrun: rank 0 measures, everyone uses it
        if planner is None:
            raise TrainingError("pipeline.partition=auto needs a partition planner")
        if ctx.rank == 0:
            cfg = planner(cfg, Path(run_dir), ctx.local_rank)
            ctx.store.set(CUTS_KEY, json.dumps(cfg.pipeline.partition))
        else:
            cfg = copy.deepcopy(cfg)
            cfg.pipeline.partition = json.loads(ctx.store.get(CUTS_KEY).decode())
    runner: StageRunner | None = None
    try:
        # The runners are imported here, in the stage processes: the launcher never needs
        # them (they pull in dynamo, and BP's torch.distributed.pipelining pulls in DTensor:
        # seconds of imports before the first stage could start).
        if cfg.method is Method.bp:
            from sidpipe.drivers.bp import BPStageRunner as Runner
        else:
            from sidpipe.drivers.sid import SIDStageRunner as Runner
        runner = Runner(ctx, cfg, Path(run_dir))
        result = runner.run()
    except BaseException as e:  # noqa: BLE001 - every failure ends this process, loudly
        step = runner.state.step if runner is not None else 0
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        lost_peer = any(m in str(e) for m in LOST_PEER)
        code = 1
        if isinstance(e, (Interrupted, KeyboardInterrupt)):  # torchrun passed a signal on
            interrupted = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
            reason, code, lost_peer = f"step {step}: {interrupted}", interrupted.exit_code, False
        elif silent := ctx.silent_peers():  # a frozen (SIGSTOP) or hung peer, by rank
            rank, age, host, pid = silent[0]
            reason = f"step {step}: stage {rank} stopped responding (no heartbeat for {age:.0f} s)"
            lost_peer = True  # wait below: the launcher should see the frozen stage die first
            if host == socket.gethostname():  # end it: the launcher then sees it die now,
                with contextlib.suppress(OSError):  # not after a 30 s grace for SIGTERM
                    os.kill(pid, signal.SIGKILL)
        elif lost_peer:
            reason = f"step {step}: lost the connection to a neighbouring stage ({reason[:120]})"
        elif type(e).__name__ != "PeerFailure":
            reason = f"step {step}: {type(e).__name__}: {reason}"
        ctx.report_failure(reason, Path(run_dir))
        _close_fault_file(fault_file, fault_path)
        if lost_peer:  # the peer died first: let the launcher see its death before ours
            time.sleep(1.0)
        # No collective after a failure (peers would block in it): leave now. os._exit skips
        # interpreter teardown, which can hang on a p2p op still posted to a dead peer.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    summary = gather_and_write(ctx, cfg, Path(run_dir), result)
    if ctx.rank == 0:  # the logger backend gets the other stages' lines and the summary
        runner.metrics.replay(Path(run_dir) / "metrics.jsonl", skip_stage=0)
        runner.metrics.summary(summary)
    runner.metrics.close()
    ctx.stop_heartbeat()
    shutdown()
    _close_fault_file(fault_file, fault_path)
    return summary


def _close_fault_file(f: Any, path: Path) -> None:
    """No native crash happened (the process is leaving by itself): drop the empty file."""
    if f is None:
        return
    faulthandler.disable()
    f.close()
    if path.stat().st_size == 0:
        path.unlink(missing_ok=True)


def native_crash(run_dir: Path, rank: int) -> str:
    """What faulthandler wrote for a stage killed by a signal: 'Fatal Python error: Aborted,
    in FILE, line N in FUNC (run_dir/stageR.fault.txt)', or '' if it wrote nothing."""
    path = run_dir / FAULT_FILE.format(rank=rank)
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    if not lines:
        return ""
    # the crashing thread is the one marked "Current thread", most recent call first
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Current thread")), 0)
    frame = next((ln.strip() for ln in lines[start:] if ln.strip().startswith("File ")), "")
    return f"{lines[0].strip()}{', in ' + frame if frame else ''} ({path})"


def run_pipeline(cfg: Config, run_dir: Path, planner: Planner | None = None) -> dict[str, Any]:
    if under_torchrun():
        return stage_main(cfg, str(run_dir), planner)
    check_graph_device(cfg, select_device(cfg))  # before any stage starts
    if cfg.pipeline.partition == "auto":
        if planner is None:
            raise TrainingError("pipeline.partition=auto needs a partition planner")
        cfg = planner(cfg, run_dir, 0)
    check_layout(cfg)
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)
    return spawn(cfg, run_dir)


def spawn(cfg: Config, run_dir: Path) -> dict[str, Any]:
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=cfg.pipeline.stages,
        run_id=f"sidpipe-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, like torchrun --standalone
        max_restarts=0,  # a failed stage fails the run: no silent restarts
        monitor_interval=0.1,
        start_method="spawn",
        rdzv_configs={"timeout": max(1, math.ceil(cfg.pipeline.timeout_s))},
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.pipeline.threads))
    # The stages print their own one-line reasons; the agent's tracebacks would bury them.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(launch, stage_main)(cfg, str(run_dir))
    except SignalException as e:  # the agent has already stopped every stage
        raise Interrupted(int(e.sigval)) from None
    except ChildFailedError as e:
        _drop_empty_fault_files(run_dir, cfg.pipeline.stages)
        reason = run_dir / FAILURE_FILE
        detail = reason.read_text().strip() if reason.exists() else "no stage reported a reason"
        first = re.match(r"\[stage (\d+)\]", detail)
        reporter = int(first.group(1)) if first else None
        crashed = [r for r, f in e.failures.items() if f.exitcode < 0]
        crash = next((c for r in sorted(crashed) if (c := native_crash(run_dir, r))), "")
        raise TrainingError(
            f"pipeline failed: {_failure_line(e, reporter)}; first reported: {detail}"
            + (f"; {crash}" if crash else "")
        ) from None
    return results[0]


def _drop_empty_fault_files(run_dir: Path, stages: int) -> None:
    """A stage that was killed (SIGKILL, the agent's SIGTERM) left its fault file empty."""
    for rank in range(stages):
        path = run_dir / FAULT_FILE.format(rank=rank)
        if path.exists() and path.stat().st_size == 0:
            path.unlink()


def _failure_line(e: Any, reporter: int | None = None) -> str:
    """Which stage died and how. A stage killed by a signal (not the agent's SIGTERM
    teardown) is the cause; otherwise the stage that reported first (failure.txt), so the
    headline and the reason name the same stage (the agent may record only a peer that
    stopped because of it); otherwise the first stage that exited with an error."""
    failures = dict(sorted(e.failures.items()))
    killed = [r for r, f in failures.items() if f.exitcode < 0 and f.signal_name() != "SIGTERM"]
    errored = [r for r, f in failures.items() if f.exitcode > 0]
    if killed:
        rank = killed[0]
    elif reporter is not None:
        rank = reporter
    else:
        rank = (errored or list(failures))[0]
    failure = failures.get(rank)
    if failure is None:
        how = "failed first"
    elif failure.exitcode < 0:
        how = f"was killed by signal {failure.signal_name()}"
    else:
        how = f"exited with code {failure.exitcode}"
    return f"stage {rank} {how}; the others were stopped"
