"""A real one-node SLURM (launch/local_slurm.sh), brought up once per session: the sbatch
script runs 2-stage SID and BP pipelines as a run without SLURM does, a preempted job
(SIGUSR1 to its batch script) requeues itself and finishes bitwise equal to an
uninterrupted run, and `sidpipe train -m hydra/launcher=submitit_slurm` submits one job per
sweep point.

Where the cluster cannot be started (not root, no apt-get) these tests skip with the
reason; under CI (CI=true) they fail instead. $SIDPIPE_SLURM_CONF names a cluster that is
already up (.ci/run starts one) instead of starting one here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sidpipe.runtime.io import load_state
from tests.conftest import REPO, TINY, fixed_ports, read_summary, run_cli

LOCAL_SLURM = REPO / "launch" / "local_slurm.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
# long enough that a signal lands mid-run (460 steps), short enough to finish in seconds
RUN = [*TINY, "train.epochs=20", "train.eval_every_epoch=false", "checkpoint.every_n_steps=100",
       "train.log_every=1"]  # fmt: skip


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment that points sbatch, squeue and scontrol at the test cluster."""
    conf = os.environ.get("SIDPIPE_SLURM_CONF")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if conf:
        yield {**base, "SLURM_CONF": conf}
        return
    env = {**base, "LOCAL_SLURM_DIR": str(tmp_path_factory.mktemp("slurm")),
           "LOCAL_SLURM_PORT": str(fixed_ports(2))}  # fmt: skip
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(LOCAL_SLURM), "up"], env=env, capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    if r.returncode == 3:  # this host cannot run it: the script says why
        reason = r.stderr.strip().splitlines()[-1]
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and no SLURM: {reason}")
        print(f"\nSLURM tests skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"\nlocal SLURM up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    conf = r.stdout.strip().split("SLURM_CONF=", 1)[1]
    try:
        yield {**env, "SLURM_CONF": conf}
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "down"], env=env, timeout=120)


def sbatch(slurm: dict[str, str], run_dir: Path, *overrides: str, stages: int = 2) -> str:
    """Submit launch/slurm.sbatch for a one-node run; returns the job id. torchrun is
    sidpipe-torchrun, from this checkout (the console script may not be installed)."""
    torchrun = run_dir.parent / "sidpipe-torchrun"
    torchrun.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m sidpipe.torchrun "$@"\n')
    torchrun.chmod(0o755)
    env = {**slurm, "NPROC_PER_NODE": str(stages), "RUN_DIR": str(run_dir),
           "TORCHRUN": str(torchrun),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    cmd = ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=1", "--gpus-per-node=0",
           f"--output={run_dir}.out", str(SBATCH), *overrides]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_state(slurm: dict[str, str], job: str) -> str:
    r = subprocess.run(["scontrol", "-o", "show", "job", job], env=slurm, capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    if "Invalid job id" in r.stderr:  # finished long enough ago to be forgotten
        return "GONE"
    fields = dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)
    return fields.get("JobState", "UNKNOWN")  # scontrol busy: ask again


def cluster_report(slurm: dict[str, str], job: str) -> str:
    """What SLURM says about a job and the tails of its daemons' logs: the reason a job
    FAILED before its script wrote anything (a launch failure) is only there."""
    r = subprocess.run(["scontrol", "show", "job", "-d", job], env=slurm, capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    out = [r.stdout + r.stderr]
    conf = Path(slurm["SLURM_CONF"])
    for key in ("SlurmctldLogFile", "SlurmdLogFile"):
        m = re.search(rf"^{key}=(.+)$", conf.read_text(), re.M) if conf.exists() else None
        if m and Path(m.group(1)).exists():
            lines = Path(m.group(1)).read_text(errors="replace").splitlines()[-25:]
            out.append(f"--- {m.group(1)}\n" + "\n".join(lines))
    return "\n".join(out)


def wait_for(slurm: dict[str, str], job: str, states: set[str], run_dir: Path,
             timeout: float = 240) -> str:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(slurm, job)
        if state in states:
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=slurm, timeout=30)
    log = Path(f"{run_dir}.out")
    pytest.fail(f"job {job} still {state} after {timeout} s:\n"
                f"{log.read_text()[-3000:] if log.exists() else ''}\n"
                f"{cluster_report(slurm, job)}")  # fmt: skip


DETERMINISTIC = ("test_accuracy", "per_depth_accuracy", "steps", "evaluations")


def same_results(slurm_run: Path, plain_run: Path) -> None:
    a, b = read_summary(slurm_run), read_summary(plain_run)
    for key in DETERMINISTIC:
        want = [{k: v for k, v in e.items() if k != "train_s"} for e in b[key]] \
            if key == "evaluations" else b[key]  # fmt: skip
        got = [{k: v for k, v in e.items() if k != "train_s"} for e in a[key]] \
            if key == "evaluations" else a[key]  # fmt: skip
        assert got == want, key
    for sa, sb in zip(a["per_stage"], b["per_stage"], strict=True):
        for key in ("bytes_sent_forward", "bytes_sent_backward", "modules"):
            assert sa.get(key) == sb.get(key), key


@pytest.fixture(scope="module")
def plain_sid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-stage SID run of RUN without SLURM: what the SLURM jobs must reproduce."""
    run_dir = tmp_path_factory.mktemp("plain") / "sid"
    r = run_cli([*RUN, "pipeline.stages=2"], run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


@pytest.mark.multiprocess
def test_sbatch_runs_sid_and_bp_as_without_slurm(slurm, plain_sid, tmp_path):
    bp = ["method=bp", "pipeline.schedule=1f1b", "train.epochs=2"]
    jobs = {"sid": sbatch(slurm, tmp_path / "sid", *RUN),
            "bp": sbatch(slurm, tmp_path / "bp", *RUN[:-1], *bp)}  # fmt: skip
    for name, job in jobs.items():
        state = wait_for(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "GONE"},
                         tmp_path / name)  # fmt: skip
        log = (tmp_path / f"{name}.out").read_text()
        assert state in ("COMPLETED", "GONE") and (tmp_path / name / "summary.json").exists(), \
            f"{log}\n{cluster_report(slurm, job)}"  # fmt: skip
    same_results(tmp_path / "sid", plain_sid)
    r = run_cli([*RUN[:-1], *bp, "pipeline.stages=2"], tmp_path / "bp-plain")
    assert r.returncode == 0, r.stderr[-2000:]
    same_results(tmp_path / "bp", tmp_path / "bp-plain")


@pytest.mark.multiprocess
def test_a_preempted_job_requeues_and_finishes_bitwise(slurm, plain_sid, tmp_path):
    run_dir = tmp_path / "pre"
    job = sbatch(slurm, run_dir, *RUN)
    deadline = time.monotonic() + 180
    while (
        not (run_dir / "metrics.jsonl").exists()
        or '"kind": "train"' not in (run_dir / "metrics.jsonl").read_text()
    ):
        assert time.monotonic() < deadline, "the job never started training"
        assert job_state(slurm, job) in ("PENDING", "RUNNING", "CONFIGURING"), job_state(slurm, job)
        time.sleep(0.3)
    # what `#SBATCH --signal=B:USR1@120` sends before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True, timeout=30)
    wait_for(slurm, job, {"PENDING"}, run_dir, timeout=120)  # requeued by the script
    log = Path(f"{run_dir}.out").read_text()
    assert "sidpipe: preempted by SIGUSR1 at step" in log, log[-3000:]
    assert "slurm.sbatch: preempted (USR1): requeueing job" in log, log[-3000:]
    assert not (run_dir / "summary.json").exists()
    # SLURM holds a requeued job for cred_expire seconds (launch/local_slurm.sh sets 10, the
    # default is 120) until slurmd forgets the revoked credential of its first attempt;
    # forcing an earlier start makes slurmd refuse the launch ("Job credential revoked").
    state = wait_for(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "GONE"}, run_dir)
    log = Path(f"{run_dir}.out").read_text()
    assert (run_dir / "summary.json").exists(), \
        f"{state}\n{log[-3000:]}\n{cluster_report(slurm, job)}"  # fmt: skip
    assert "attempt 1" in log and "resumed from" in log, log[-3000:]
    assert "sidpipe-torchrun: stopped by SIGUSR1" in log and "Traceback" not in log, log[-3000:]
    want, got = load_state(plain_sid), load_state(run_dir)
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k


@pytest.mark.multiprocess
def test_a_sweep_submits_one_job_per_point(slurm, tmp_path):
    """hydra's submitit launcher: one SLURM job per point, each a whole pipeline with its
    own run directory and summary."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {**slurm, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           }  # fmt: skip
    cmd = [sys.executable, "-m", "sidpipe.cli", "train", "-m", "hydra/launcher=submitit_slurm",
           *TINY, "pipeline.stages=2", "train.epochs=1", "optim.lr=1e-3,3e-3",
           f"hydra.sweep.dir={tmp_path}", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=10"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0", "1"], r.stdout[-2000:]
    lrs = [json.loads(p.read_text())["config"]["optim"]["lr"] for p in summaries]
    assert lrs == [1e-3, 3e-3]
    # one array task per point (submitit's folder: JOB_TASK/ with each task's log)
    tasks = sorted(p.name for p in (tmp_path / ".submitit").iterdir()
                   if p.is_dir() and "_" in p.name)  # fmt: skip
    assert [t.split("_")[1] for t in tasks] == ["0", "1"], tasks
