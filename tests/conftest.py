"""Shared test helpers: the offline data root and a runner for the real CLI."""

from __future__ import annotations

import json
import multiprocessing.process
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch  # noqa: F401 - imported at collection: its first import runs ldconfig

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (CI lays a copy there); SIDPIPE_DATA overrides.
DATA_ROOT = Path(os.environ.get("SIDPIPE_DATA", REPO.parent / "shared" / "data"))

# Small, fast settings for multi-process runs on 2 cores.
TINY = [
    "data=digits",
    "model=mlp",
    "model.width=64",
    "model.depth=4",
    "train.batch_size=64",
    "pipeline.threads=1",
    "pipeline.timeout_s=60",
    "progress=false",
]


def run_cli(
    args: list[str],
    run_dir: Path,
    timeout: float = 180,
    env: dict | None = None,
    module: str = "sidpipe.cli",
) -> subprocess.CompletedProcess:
    """Run `python -m sidpipe.cli train ...` as a user would; bounded so a hang fails."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        module,
        *([] if module != "sidpipe.cli" else ["train"]),
        *args,
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO
    )


def run_clean(
    cmd: list[str], home: Path, timeout: float = 180, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run a command as a fresh shell would: minimal environment, 1 thread, bounded time."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(home)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def torchrun(nproc: int) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m sidpipe.train`, via this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "sidpipe.train"]  # fmt: skip


def assert_run_stopped(r: subprocess.CompletedProcess, reason: str, run_dir: Path) -> None:
    """A failed run: non-zero exit, the reason printed, no summary, no process left behind."""
    assert r.returncode != 0
    assert reason in r.stderr, r.stderr[-2000:]
    assert not (run_dir / "summary.json").exists()
    ps = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def train_in_process(overrides: list[str], run_dir: Path) -> dict:
    """What `sidpipe train` runs, in this process (single-process runs start no process)."""
    from sidpipe import drivers
    from sidpipe.config import compose_config

    return drivers.run(compose_config(overrides), run_dir)


def refusal(overrides: list[str], run_dir: Path) -> str:
    """What `sidpipe train` refuses, in this process: the SidpipeError the CLI prints as its one
    line. The conftest guard fails the test if anything started a process first."""
    from sidpipe import drivers
    from sidpipe.config import compose_config
    from sidpipe.errors import SidpipeError

    with pytest.raises(SidpipeError) as e:
        drivers.run(compose_config([*TINY, *overrides]), run_dir)
    assert not (run_dir / "metrics.jsonl").exists()  # nothing trained
    assert not (run_dir / "failure.txt").exists()  # no stage process was started
    return str(e.value)


def fixed_ports(n: int = 1) -> int:
    """The first of n consecutive free ports on 127.0.0.1 for a server a test starts by
    number (a c10d rendezvous, slurmctld + slurmd). Taken below the kernel's ephemeral range
    (ip_local_port_range), which is where every bind to port 0 lands: so no other process's
    gloo pair or TCPStore takes the port between this check and the server's own bind. A
    port from bind(0) could be taken in between, and torchrun's c10d backend then joins
    that stranger's store as a client instead of failing."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()  # not the tests' seeded global generator
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low - n)
        try:
            for i in range(n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + i))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no {n} free consecutive ports below {low}")


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(autouse=True)
def _tiers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast tier stays in-process: a test that starts a process must be marked
    `multiprocess` (make test-fast leaves those out), or it fails here, at once."""
    if request.node.get_closest_marker("multiprocess") or request.node.get_closest_marker("slow"):
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(
            f"{request.node.nodeid} starts a process: mark it @pytest.mark.multiprocess"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


@pytest.fixture
def data_root() -> Path:
    if not (DATA_ROOT / "MNIST" / "raw").exists():
        pytest.skip(f"offline datasets not found at {DATA_ROOT}")
    return DATA_ROOT


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """A run in this process sets torch's thread count (pipeline.threads, auto by default):
    put it back, so one test's setting never times or orders the next test's kernels."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
