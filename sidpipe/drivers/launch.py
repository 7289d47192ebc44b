"""Start a pipeline run: join torchrun's process group, or spawn one process per stage.

Started plainly, `sidpipe train pipeline.stages=S` spawns S local processes through torch's
own elastic launcher (the engine behind torchrun): it gives the rendezvous store, watches
the workers and, when one fails or is killed, stops the others, so no peer is left hanging.

With `pipeline.max_restarts=N` (torchrun: `--max-restarts N`) the same agent then starts
every stage again, at most N times; each restarted attempt continues from the run's newest
verified checkpoint (`after_restart`). A preemption signal (runtime/preempt.py) ends the
run after a checkpoint, with exit status 75 (`errors.EXIT_PREEMPTED`).
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
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import (
    SignalException,
    _terminate_process_handler,
)
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from sidpipe.config import Config, Method
from sidpipe.data import load_data
from sidpipe.drivers.balance import plan_partition
from sidpipe.drivers.rundir import prepare_run_dir
from sidpipe.drivers.summary import gather_and_write
from sidpipe.errors import Interrupted, Preempted, SidpipeError, TrainingError
from sidpipe.method.learner import check_graph_device
from sidpipe.models import build_net
from sidpipe.models.partition import partition_blocks
from sidpipe.runtime.device import check_cores, select_device, stage_threads
from sidpipe.runtime.dist import (
    FAILURE_DIR_ENV,
    check_transport,
    init_distributed,
    shutdown,
    under_torchrun,
    write_failure,
)
from sidpipe.runtime.preempt import PREEMPT_SIGNALS, Preemption
from sidpipe.runtime.resume import checkpoint_root, drop_partial, latest_good, step_of

RUN_DIR_KEY = "sidpipe/run_dir"
CUTS_KEY = "sidpipe/partition"
LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
FAILURE_FILE = "failure.txt"  # the first failing stage's one-line reason
FAULT_FILE = "stage{rank}.fault.txt"  # a stage's Python stacks if a signal (SIGABRT...) kills it


if TYPE_CHECKING:
    from sidpipe.drivers.runner import RankRunner


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


def restart_count() -> int:
    """Which attempt this is: 0, or how often the elastic agent (torchrun's, or the one
    sidpipe spawns) has restarted every stage after one of them died."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def after_restart(cfg: Config, run_dir: Path) -> Config:
    """The config of a restarted attempt: it continues from the run's newest verified
    checkpoint (resume=auto), or, with none written yet, starts as the first attempt did
    (resume=PATH: from that checkpoint; else afresh, the died attempt's outputs removed by
    the run-directory check). Rank 0 prints why, in one line, and clears failure.txt so the
    next failure is reported as its own."""
    attempt = restart_count()
    if attempt == 0:
        return cfg
    start = latest_good(checkpoint_root(cfg, run_dir))
    cfg = copy.deepcopy(cfg)
    if start is not None or cfg.resume is None:
        cfg.resume = "auto"
    if os.environ.get("RANK", "0") == "0":
        failure = run_dir / FAILURE_FILE
        reason = failure.read_text().strip() if failure.exists() else "a stage died"
        failure.unlink(missing_ok=True)
        where = start or (cfg.resume if cfg.resume != "auto" else "the start (no checkpoint yet)")
        total = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
        print(f"sidpipe: restart {attempt} of {total} after: {reason}; resuming from {where}",
              file=sys.stderr, flush=True)  # fmt: skip
    return cfg


def _spawned_stage(cfg: Config, run_dir: str) -> dict[str, Any]:
    """A stage process started by `spawn`: a restarted attempt first continues the run."""
    if restart_count():
        cfg = after_restart(cfg, Path(run_dir))
        prepare_run_dir(cfg, Path(run_dir))
    return stage_main(cfg, run_dir)


def stage_main(cfg: Config, run_dir: str) -> dict[str, Any]:
    """One stage process. Returns the summary on rank 0, {} elsewhere; exits non-zero on failure.
    A preempted run returns {"_preempted": {...}} on rank 0 instead (`preempted_info`)."""
    try:
        ctx = init_distributed(cfg)
    except BaseException as e:  # noqa: BLE001 - before the process group: no peer to tell,
        line = f"[stage {os.environ.get('RANK', '?')}] {_reason(e)}"  # the launcher reads it
        print(f"sidpipe: error: {line}", file=sys.stderr, flush=True)
        write_failure(Path(run_dir), line)
        os._exit(1)
    preemption = Preemption(ctx.store).install()  # SIGUSR1 / SIGTERM: save and stop
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
        if ctx.rank == 0:
            cfg = plan_partition(cfg, Path(run_dir), ctx.local_rank)
            ctx.store.set(CUTS_KEY, json.dumps(cfg.pipeline.partition))
        else:
            cfg = copy.deepcopy(cfg)
            cfg.pipeline.partition = json.loads(ctx.store.get(CUTS_KEY).decode())
    runner: RankRunner | None = None
    try:
        # The runners are imported here, in the stage processes: the launcher never needs
        # them (they pull in dynamo, and BP's torch.distributed.pipelining pulls in DTensor:
        # seconds of imports before the first stage could start).
        if cfg.method is Method.bp:
            from sidpipe.drivers.bp import BPRunner as Runner
        else:
            from sidpipe.drivers.sid import SIDRunner as Runner
        runner = Runner(ctx, cfg, Path(run_dir))
        runner.preemption = preemption
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
            reason = f"step {step}: {_reason(e)}"
        ctx.report_failure(reason, Path(run_dir))
        _close_fault_file(fault_file, fault_path)
        if lost_peer:  # the peer died first: let the launcher see its death before ours
            time.sleep(1.0)
        # No collective after a failure (peers would block in it): leave now. os._exit skips
        # interpreter teardown, which can hang on a p2p op still posted to a dead peer.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if result["_preempted"]:  # every stage saved its part and stopped: no summary
        dist.barrier()  # ... and the last of them has published the checkpoint
        info = preempted_info(cfg, Path(run_dir), preemption.signame, runner.state.step)
        runner.metrics.close()
        ctx.stop_heartbeat()
        shutdown()
        _close_fault_file(fault_file, fault_path)
        return {"_preempted": info} if ctx.rank == 0 else {}
    try:
        summary = gather_and_write(ctx, cfg, Path(run_dir), result)
    except Exception as e:  # noqa: BLE001 - e.g. a full disk under summary.json: one line
        ctx.report_failure(f"writing the summary: {_reason(e)}", Path(run_dir))
        sys.stderr.flush()
        os._exit(1)
    if ctx.rank == 0:  # the logger backend gets the other stages' lines and the summary
        runner.metrics.replay(Path(run_dir) / "metrics.jsonl", skip_stage=0)
        runner.metrics.summary(summary)
    runner.metrics.close()
    ctx.stop_heartbeat()
    shutdown()
    _close_fault_file(fault_file, fault_path)
    return summary


def _reason(e: BaseException) -> str:
    """An error in one line: a sidpipe error says what to do; anything else is named."""
    first = str(e).splitlines()[0] if str(e) else ""
    return first if isinstance(e, SidpipeError) else f"{type(e).__name__}: {first}".rstrip(": ")


def preempted_info(cfg: Config, run_dir: Path, signame: str, step: int) -> dict[str, Any]:
    saved = latest_good(checkpoint_root(cfg, run_dir))
    return {"signal": signame, "step": step_of(saved) if saved else step,
            "checkpoint": str(saved) if saved else None}  # fmt: skip


def preempted(info: dict[str, Any]) -> Preempted:
    return Preempted(info["signal"], info["step"], info["checkpoint"])


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


def run_pipeline(cfg: Config, run_dir: Path) -> dict[str, Any]:
    if under_torchrun():
        result = stage_main(cfg, str(run_dir))
        if "_preempted" in result:  # rank 0 says so; every worker exits 0, so that the agent
            # does not restart them (the job script requeues: launch/slurm.sbatch)
            print(f"sidpipe: {preempted(result['_preempted'])}", file=sys.stderr, flush=True)
            return {}
        return result
    device = select_device(cfg)  # before any stage starts:
    check_graph_device(cfg, device)
    check_transport(cfg, device)
    if cfg.pipeline.partition == "auto":  # measured once, here: the stages get the cuts
        cfg = plan_partition(cfg, run_dir, 0)
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
        max_restarts=cfg.pipeline.max_restarts,  # each restart resumes: after_restart
        monitor_interval=0.1,
        start_method="spawn",
        rdzv_configs={"timeout": max(1, math.ceil(cfg.pipeline.timeout_s))},
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(stage_threads(cfg, cfg.pipeline.stages)))
    # The stages print their own one-line reasons; the agent's tracebacks would bury them.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.multiprocessing").setLevel(logging.ERROR)  # "Terminating process"
    fallback = Path(tempfile.mkdtemp(prefix="sidpipe-failure-"))  # if run_dir is full
    os.environ[FAILURE_DIR_ENV] = str(fallback)  # the stages inherit it
    # A preemption signal (SIGUSR1, SIGTERM) is passed on to the stages, which save and stop
    # by themselves; the agent keeps watching them (had it the signal, it would close them,
    # and a spawned stage that has returned waits for the agent to collect its result: the
    # agent's 30 s grace, then SIGKILL). A second one stops the run at once.
    launch.signals_to_handle = "SIGINT,SIGHUP,SIGQUIT"
    forward = _ForwardToStages()
    previous = {sig: signal.signal(sig, forward) for sig in PREEMPT_SIGNALS}
    try:
        results = elastic_launch(launch, _spawned_stage)(cfg, str(run_dir))
    except SignalException as e:  # the agent has already stopped every stage
        if e.sigval in PREEMPT_SIGNALS:  # a second preemption signal: they were stopped
            raise preempted(preempted_info(cfg, run_dir, e.sigval.name, 0)) from None
        raise Interrupted(int(e.sigval)) from None
    except ChildFailedError as e:
        _drop_empty_fault_files(run_dir, cfg.pipeline.stages)
        drop_partial(checkpoint_root(cfg, run_dir))  # parts of a checkpoint no stage finished
        reason = next((p for p in (run_dir / FAILURE_FILE, fallback / FAILURE_FILE)
                       if p.is_file() and p.stat().st_size), None)  # fmt: skip
        detail = reason.read_text().strip() if reason else "no stage reported a reason"
        reporter = reporting_stage(detail)
        crashed = [r for r, f in e.failures.items() if f.exitcode < 0]
        crash = next((c for r in sorted(crashed) if (c := native_crash(run_dir, r))), "")
        restarts = cfg.pipeline.max_restarts
        after = f" (after {restarts} restart{'s' * (restarts > 1)})" if restarts else ""
        raise TrainingError(
            f"pipeline failed{after}: {_failure_line(e, reporter)}; first reported: {detail}"
            + (f"; {crash}" if crash else "")
        ) from None
    finally:
        shutil.rmtree(fallback, ignore_errors=True)
        os.environ.pop(FAILURE_DIR_ENV, None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "_preempted" in results[0]:  # the signal reached the stages only
        raise preempted(results[0]["_preempted"])
    return results[0]


class _ForwardToStages:
    """The launcher's handler for a preemption signal: pass it on to the stage processes
    (its children started by multiprocessing's spawn); a second one stops the run now."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            _terminate_process_handler(signum, frame)  # raises: the agent stops every stage
        self.signum = signum
        for pid in _stage_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signum)


def _stage_pids() -> list[int]:
    """This process's children that multiprocessing spawned (not its resource tracker)."""
    me, out = os.getpid(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == me and b"spawn_main" in (proc / "cmdline").read_bytes():
                out.append(int(proc.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return out


def _drop_empty_fault_files(run_dir: Path, stages: int) -> None:
    """A stage that was killed (SIGKILL, the agent's SIGTERM) left its fault file empty."""
    for rank in range(stages):
        path = run_dir / FAULT_FILE.format(rank=rank)
        if path.exists() and path.stat().st_size == 0:
            path.unlink()


def reporting_stage(line: str) -> int | None:
    """The stage a failure.txt line is about: "[stage a] ..." names a, but "[stage a]
    stopping: [stage b] ..." means a stopped because of b, so b."""
    m = re.match(r"\[stage \d+\] stopping: \[stage (\d+)\]", line) or re.match(
        r"\[stage (\d+)\]", line
    )
    return int(m.group(1)) if m else None


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
