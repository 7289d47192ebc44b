"""benchmarks/cifar10_convnets.sh still describes the committed CIFAR-10 convnet study (its
BP runs now with one microbatch) and plans the belief-heads study (PARTS=heads) exactly.

The script is run for real with a `sidpipe` on PATH that records each invocation; each is
then planned in this process (`sidpipe accuracy ... study.plan=true`: composes and validates
its runs, trains nothing), so torch is imported once, not once per invocation. Run names
carry a digest of each run's overrides, so equal names mean the script reproduces those
exact runs — and that rerunning it resumes the study instead of starting another.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import chdir, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidpipe.bench import accuracy
from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "cifar10_convnets.sh"
RESULTS = REPO / "benchmarks" / "results" / "cifar10-convnets-50-epochs-2026-12-01"
RESULTS_100 = REPO / "benchmarks" / "results" / "cifar10-convnets-100-epochs-2026-12-01"


@dataclass
class Planned:
    returncode: int  # the script's, else the first failing invocation's
    stdout: str  # every invocation's plan, in order
    stderr: str


def planned(tmp_path: Path, **env: str) -> Planned:
    calls = tmp_path / "calls"
    calls.mkdir()
    shim = tmp_path / "bin" / "sidpipe"
    shim.parent.mkdir(exist_ok=True)
    shim.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > "{calls}/$(ls "{calls}" | wc -l)"\n')
    shim.chmod(0o755)
    path = f"{shim.parent}{os.pathsep}{os.environ['PATH']}"
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PATH": path, **env}, timeout=300)  # fmt: skip
    out, err, rc = io.StringIO(), io.StringIO(), r.returncode
    # the script's relative paths (DATA=../shared/data) are from the repo
    with chdir(REPO):
        for call in sorted(calls.iterdir(), key=lambda f: int(f.name)):
            command, *argv = call.read_text().split("\0")[:-1]
            assert command == "accuracy", command
            with redirect_stdout(out), redirect_stderr(err):
                code = accuracy.main([*argv, "study.plan=true"])
            if code:
                rc = rc or code
                break
    return Planned(rc, out.getvalue(), r.stderr + err.getvalue())


def run_names(r: Planned) -> set[str]:
    """The runs a plan lists, one `name: ...` line each."""
    return {line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("cifar10-")}


def committed(folder: Path) -> set[str]:
    return {r["name"] for r in json.loads((folder / "blockwise.json").read_text())["rows"]}


def split_bp(names: set[str]) -> tuple[set[str], set[str]]:
    """(local runs, BP runs) of a set of run names."""
    bp = {n for n in names if "-bp-" in n}
    return names - bp, bp


def same_but_bp_batch(r: Planned, expected: set[str]) -> None:
    """The plan has the committed local runs, to the name; its BP runs are the committed ones
    with one microbatch (BatchNorm over SID's batch), so they are new runs, one for each:
    the committed BP numbers normalised over a quarter of the batch."""
    local, bp = split_bp(run_names(r))
    want_local, want_bp = split_bp(expected)
    assert local == want_local
    assert len(bp) == len(want_bp) and not bp & want_bp
    assert {n.rsplit("-", 2)[0] for n in bp} == {n.rsplit("-", 2)[0] for n in want_bp}
    bp_lines = [line for line in r.stdout.splitlines() if "-bp-" in line.split(":")[0]]
    assert bp_lines and all("pipeline.microbatches=1" in line for line in bp_lines)


@pytest.mark.multiprocess
def test_the_script_plans_exactly_the_committed_runs(tmp_path) -> None:
    r = planned(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lrs = [RESULTS / f"lr-{lr}" for lr in ("3e-4", "3e-3", "1e-2")]
    expected = set().union(*(committed(f) for f in [RESULTS, RESULTS / "bp-100-epochs", *lrs]))
    assert len(expected) == 42 + 3 + 3 * 15  # 2 models x 7 cells x 3 seeds; BP x 3; 3 lrs
    same_but_bp_batch(r, expected)


@pytest.mark.multiprocess
def test_the_100_epoch_command_plans_exactly_its_committed_runs(tmp_path) -> None:
    """The 100-epoch study: both models, and its two convergence checks at 200 epochs."""
    r = planned(tmp_path, EPOCHS="100", OUT=str(RESULTS_100.relative_to(REPO)),
                PARTS="resnet18 vgg11 bp-epochs vgg11-epochs")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    checks = [RESULTS_100 / "bp-200-epochs", RESULTS_100 / "vgg11-200-epochs"]
    expected = set().union(*(committed(f) for f in [RESULTS_100, *checks]))
    assert len(expected) == 42 + 3 + 21  # 2 models x 7 cells x 3 seeds; BP x 3; VGG-11 x 21
    same_but_bp_batch(r, expected)


@pytest.mark.multiprocess
def test_an_unknown_part_is_named(tmp_path) -> None:
    r = planned(tmp_path, PARTS="resnet18 vgg")
    assert r.returncode == 2
    assert "unknown part 'vgg' in PARTS" in r.stderr
    assert "cifar10-" not in r.stdout  # checked before anything runs


def planned_runs(stdout: str) -> list[list[tuple[str, list[str]]]]:
    """Per `sidpipe accuracy` invocation, its runs as (name, overrides), in plan order."""
    blocks: list[list[tuple[str, list[str]]]] = []
    for line in stdout.splitlines():
        if line.startswith("# blockwise:"):
            blocks.append([])
        elif line.startswith("cifar10-"):
            name, _, overrides = line.partition(": ")
            blocks[-1].append((name, overrides.split()))
    return blocks


def setting(overrides: list[str]) -> tuple:
    """(model, method, head, blocks, seed, lr) of a run from its overrides."""
    kv = dict(o.split("=", 1) for o in overrides)
    method = kv["method"]
    if method == "sid" and kv.get("sid.alpha") == "1.0":
        method = "greedy"
    head = None if method == "bp" else kv.get("model.head", "pool")
    return (kv["model"], method, head, int(kv["model.blocks"]) if "model.blocks" in kv else None,
            int(kv["seed"]), kv["optim.lr"])  # fmt: skip


@pytest.mark.multiprocess
def test_the_heads_part_plans_exactly_the_heads_study(tmp_path) -> None:
    """ResNet-18 and VGG-11, K = 2/4/8, SID and greedy each with pool and the new head, BP
    (one microbatch), 100 epochs: seed 0 at each lr first (the lr search); ResNet-18 at K = 4
    and 8 first. With no results yet, the search asks for nothing more."""
    r = planned(tmp_path, EPOCHS="100", PARTS="heads", HEADS_OUT=str(tmp_path / "heads"),
                PYTHON=sys.executable)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    invocations = planned_runs(r.stdout)
    lrs = ("3e-4", "1e-3", "3e-3")
    intended = {(model, "bp", None, None, 0, lr) for model in ("resnet18", "vgg11")
                for lr in lrs}  # fmt: skip
    intended |= {(model, method, head, k, 0, lr) for model in ("resnet18", "vgg11")
                 for method in ("sid", "greedy") for head in ("pool", "spatial")
                 for k in (2, 4, 8) for lr in lrs}  # fmt: skip
    runs = [run for inv in invocations for run in inv]
    assert {setting(o) for _, o in runs} == intended
    assert len({name for name, _ in runs}) == len(intended) == 2 * 3 * (1 + 2 * 2 * 3)
    # every run: 100 epochs, width 8, the study's subset of CIFAR-10 and its split
    for name, o in runs:
        assert {"train.epochs=100", "model.width=8", "data.val_fraction=0.1",
                "train.batch_size=128"} <= set(o), name  # fmt: skip
        assert ("pipeline.microbatches=1" in o) == ("method=bp" in o), name
    # ResNet-18 at K = 4 and 8 comes first, at every lr
    first = [setting(o) for inv in invocations[:3] for _, o in inv]
    assert {(m, k) for m, _, _, k, _, _ in first} == {("resnet18", None), ("resnet18", 4),
                                                      ("resnet18", 8)}  # fmt: skip
    # the pool arm at lr 1e-3 is the committed 100-epoch study's local runs, to the name
    pool = {name for name, o in runs if "optim.lr=1e-3" in o and "method=bp" not in o
            and not any(x.startswith("model.head=") for x in o)}  # fmt: skip
    assert pool == {n for n in committed(RESULTS_100) if "-bp-" not in n and n.endswith("-s0")}


def rows(folder: Path, cells: dict[tuple, float]) -> None:
    """A blockwise.json of seed-0 results: (method, head, K) -> best validation accuracy."""
    folder.mkdir(parents=True)
    body = [{"status": "ran", "model": "resnet18", "method": m, "head": h, "blocks": k,
             "seed": 0, "val_curve": [0.1, v], "val_selected_test_accuracy": v}
            for (m, h, k), v in cells.items()]  # fmt: skip
    (folder / "blockwise.json").write_text(json.dumps({"rows": body}))


@pytest.mark.multiprocess
def test_the_heads_part_runs_what_validation_asks_for_next(tmp_path) -> None:
    """Seed-0 results at every lr: BP is best in the middle, so seeds 1 and 2 run there; SID
    with the spatial head is best at the top edge, so seed 0 runs one lr further out. Plans
    train nothing, so the search then sees no progress and stops in one line."""
    out = tmp_path / "heads"
    for lr, bp, sid in (("1e-3", 0.5, 0.4), ("3e-3", 0.6, 0.5), ("1e-2", 0.55, 0.6)):
        rows(out / f"lr-{lr}", {("bp", None, None): bp, ("sid", "spatial", 4): sid})
    r = planned(tmp_path, EPOCHS="100", PARTS="heads", HEADS_OUT=str(out), PYTHON=sys.executable,
                HEAD_LRS="1e-3 3e-3 1e-2", HEAD_LRS_BEYOND="3e-2")  # fmt: skip
    assert r.returncode == 1
    assert "the lr search made no progress; still to run: 3e-3 resnet18 bp - - [1,2];" \
        "3e-2 resnet18 sid spatial 4 [0]" in r.stderr  # fmt: skip
    asked = planned_runs(r.stdout)[3:]  # after seed 0 at the three lrs
    assert [sorted(setting(o) for _, o in inv) for inv in asked] == [
        [("resnet18", "bp", None, None, 1, "3e-3"), ("resnet18", "bp", None, None, 2, "3e-3")],
        [("resnet18", "sid", "spatial", 4, 0, "3e-2")],
    ]


@pytest.mark.multiprocess
def test_the_runs_asked_for_at_one_lr_share_calls(tmp_path) -> None:
    """At an edge every cell asks for seed 0 one lr out: the runs go in as few calls as give
    exactly them (so each call trains JOBS at a time), BP riding along with the first."""
    out = tmp_path / "heads"
    cells = {("bp", None, None): 0.6, ("greedy", "pool", 4): 0.5, ("greedy", "spatial", 4): 0.5,
             ("greedy", "pool", 8): 0.5, ("greedy", "spatial", 8): 0.5,
             ("sid", "pool", 4): 0.5, ("sid", "spatial", 8): 0.5}  # fmt: skip
    for lr, shift in (("1e-3", 0.0), ("3e-3", 0.1)):  # every cell best at the top edge
        rows(out / f"lr-{lr}", {key: v + shift for key, v in cells.items()})
    r = planned(tmp_path, EPOCHS="100", PARTS="heads", HEADS_OUT=str(out), PYTHON=sys.executable,
                HEAD_LRS="1e-3 3e-3", HEAD_LRS_BEYOND="1e-2")  # fmt: skip
    assert r.returncode == 1 and "the lr search made no progress" in r.stderr
    asked = [sorted(setting(o) for _, o in inv) for inv in planned_runs(r.stdout)[2:]]
    greedy = [("resnet18", "greedy", h, k, 0, "1e-2") for h in ("pool", "spatial") for k in (4, 8)]
    assert asked == [
        sorted([("resnet18", "bp", None, None, 0, "1e-2"), *greedy]),  # a full grid + BP
        [("resnet18", "sid", "pool", 4, 0, "1e-2")],  # not a grid with the next: its own call
        [("resnet18", "sid", "spatial", 8, 0, "1e-2")],
    ]
