"""Executing a study's runs, resumably, and merging their rows with earlier invocations'.

Each run is `sidpipe train` composed from its overrides (the same config `sidpipe train`
would build), trained single-process here or in `study.jobs` worker processes. A run whose
folder holds summary.json is done: it is not run again (its row says so). Every run saves a
checkpoint at each epoch end, so a folder without summary.json is an interrupted run that
continues from its last finished epoch (resume is exact: the result is the uninterrupted
run's); the checkpoint is removed once the run is done.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import shlex
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from sidpipe import drivers
from sidpipe.bench.accuracy.plan import Run, cost_key
from sidpipe.bench.accuracy.stats import Row
from sidpipe.config import compose_config
from sidpipe.data import load_data
from sidpipe.runtime.cadence import steps_per_epoch

log = logging.getLogger("sidpipe.accuracy")

ID_KEYS = (
    "dataset",
    "arch",
    "model",
    "blocks",
    "method",
    "head",
    "variant",
    "noise",
    "alpha",
    "kl",
)


def execute(run: Run, run_dir: str | Path) -> dict[str, Any]:
    """Compose the run's config exactly as `sidpipe train` would, then train in this process,
    checkpointing at every epoch end and continuing an interrupted attempt from its last
    checkpoint (`resume=auto`; a died attempt without one leaves partial outputs, which
    resume=auto clears). Only runs without a summary.json get here."""
    cfg = compose_config(run.overrides)
    every = steps_per_epoch(cfg, load_data(cfg.data, cfg.seed))
    resumable = [*run.overrides, f"checkpoint.every_n_steps={every}", "checkpoint.keep_last=1",
                 "resume=auto"]  # fmt: skip
    summary = drivers.run(compose_config(resumable), run_dir)
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)  # done: free the disk
    return summary


def _worker(run: Run, run_dir: str) -> dict[str, Any]:
    """Process-pool entry: one run, its summary or the error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return {"summary": execute(run, run_dir)}
    except Exception as e:  # noqa: BLE001 - recorded in the row, the study goes on
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def extract(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers a study needs from a run's summary.json."""
    epochs = summary.get("epochs_run") or 1
    evals = summary.get("evaluations") or []
    return {
        "test_accuracy": summary.get("test_accuracy"),
        "best_epoch_test_accuracy": summary.get("best_epoch_test_accuracy"),
        "val_selected_test_accuracy": summary.get("val_selected_test_accuracy"),
        "best_epoch": summary.get("best_epoch"),
        "val_selected_epoch": summary.get("val_selected_epoch"),
        "per_depth_accuracy": summary.get("per_depth_accuracy") or [],
        "val_per_depth": (evals[-1].get("val_per_depth") if evals else None) or [],
        "epochs_run": summary.get("epochs_run"),
        "s_per_epoch": summary.get("train_s", summary.get("wall_s", 0.0)) / epochs,
        "samples_per_s": summary.get("samples_per_s"),
        "wall_s": summary.get("wall_s"),
        "label_noise_rate": summary.get("label_noise_rate"),
        "curve": [e["test_per_depth"][-1] for e in evals],
        "val_curve": [e["val_per_depth"][-1] for e in evals if e.get("val_per_depth")],
        "width": ((summary.get("config") or {}).get("model") or {}).get("width"),
        "schedule": ((summary.get("config") or {}).get("optim") or {}).get("schedule"),
    }


def base_row(run: Run, run_dir: Path, out: Path, meta: dict[str, Any]) -> Row:
    return {
        "study": run.study,
        "name": run.name,
        "group": run.group,
        **run.labels,
        "subset": meta["knobs"]["subset"],
        "invocation": meta["id"],
        "run_dir": str(run_dir.relative_to(out)),
        "command": shlex.join(["sidpipe", "train", *run.overrides, f"hydra.run.dir={run_dir}"]),
    }


def run_all(runs: list[Run], out: Path, jobs: int, meta: dict[str, Any]) -> list[Row]:
    """Train every run not done yet; one row per run (resumable: summary.json = done)."""
    rows: dict[int, Row] = {}
    todo: list[tuple[int, Run, Path]] = []
    for i, run in enumerate(runs):
        run_dir = out / "runs" / run.study / run.name
        row = rows[i] = base_row(run, run_dir, out, meta)
        if run.skip_reason:
            row.update(status="skipped", reason=run.skip_reason)
        elif (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
            row.update(status="reused", reason=f"result exists: {row['run_dir']}/summary.json")
            row.update(extract(summary))
        else:  # new, or interrupted: execute() continues it from its last checkpoint
            todo.append((i, run, run_dir))
    if todo:
        log.info("%d run(s) to train, %d done or skipped", len(todo), len(runs) - len(todo))
    t0 = time.perf_counter()

    def record(k: int, i: int, result: dict[str, Any]) -> None:
        row = rows[i]
        if "summary" in result:
            row.update(status="ran", **extract(result["summary"]))
        else:
            row.update(status="failed", reason=result["error"])
            log.error("run %s failed: %s\n%s", row["name"], result["error"],
                      result.get("traceback", ""))  # fmt: skip
        log.info("[%d/%d] %s: %s (%.0f s so far)", k, len(todo), row["name"], row["status"],
                 time.perf_counter() - t0)  # fmt: skip

    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_worker, run, str(d)): i for i, run, d in todo}
            for k, fut in enumerate(as_completed(futures), 1):
                record(k, futures[fut], fut.result())
    else:
        for k, (i, run, d) in enumerate(todo, 1):
            log.info("[%d/%d] training %s", k, len(todo), run.name)
            record(k, i, _worker(run, str(d)))
    return [rows[i] for i in range(len(runs))]


# ---------------------------------------------------------------------------- merging


def identity(row: Row) -> tuple:
    """What a run measures, seed and settings aside."""
    return tuple(row.get(k) for k in ID_KEYS)


def merge(old: dict[str, Any] | None, new: list[Row], out: Path) -> list[Row]:
    """This invocation's rows plus the finished rows of earlier invocations that it does not
    supersede: another configuration (e.g. other models), or more seeds of the very same
    settings (same group). An earlier row of the same configuration with other settings
    (epochs, subset, overrides) is dropped: the newest invocation wins. A run this
    invocation reused keeps the earlier invocation that trained it."""
    if not old:
        return new
    # The invocation that trained a run is its provenance (command, date, machine): reporting
    # a finished study again must not restamp every run with today's date.
    trained = {(r["name"], r.get("run_dir")): r.get("invocation") for r in old["rows"]
               if r.get("status") in ("ran", "reused")}  # fmt: skip
    for r in new:
        if r.get("status") == "reused" and trained.get((r["name"], r["run_dir"])):
            r["invocation"] = trained[(r["name"], r["run_dir"])]
    names = {r["name"] for r in new}
    ids = {identity(r) for r in new}
    groups = {r["group"] for r in new}
    kept = [
        {**r, "status": "reused", "reason": "from an earlier invocation"}
        for r in old["rows"]
        if r.get("status") in ("ran", "reused")
        and r["name"] not in names
        and (r["group"] in groups or identity(r) not in ids)
        and (out / r["run_dir"] / "summary.json").is_file()
    ]
    return new + kept


def merged_invocations(
    old: dict[str, Any] | None, rows: list[Row], meta: dict[str, Any]
) -> dict[str, Any]:
    """The invocations (id -> meta) whose runs the merged rows show."""
    invocations = {**(old or {}).get("invocations", {}), meta["id"]: meta}
    used = {r.get("invocation") for r in rows}
    return {k: v for k, v in invocations.items() if k in used}


# ---------------------------------------------------------------------------- estimate


def measure(
    plans: dict[str, list[Run]], out: Path, steps: int
) -> tuple[dict[tuple, float], dict[tuple, int]]:
    """Train `steps` batches of each distinct kind of run (evaluation off): samples/s and the
    training-set size of each kind. Training time only: the per-epoch evaluation of the test
    and validation splits (forward passes of 16k samples on MNIST) adds roughly 10-20 %."""
    probes: dict[tuple, Run] = {}
    for runs in plans.values():
        for r in runs:
            if not r.skip_reason:
                probes.setdefault(cost_key(r), r)
    rate: dict[tuple, float] = {}
    n_train: dict[tuple, int] = {}
    extra = [f"train.max_steps={steps}", "train.eval_every_epoch=false", "train.final_eval=false"]
    ordered = sorted(probes.items(), key=lambda kv: str(kv[0]))

    def probe(r: Run, name: str) -> dict[str, Any]:
        run_dir = out / "estimate" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a finished probe would be reused, unmeasured
        return execute(Run(r.study, r.name, r.labels, [*r.overrides, *extra], None, r.epochs,
                           r.owned), run_dir)  # fmt: skip

    if ordered:  # the process's first run also pays one-time costs (kernel choice, allocator
        r = ordered[0][1]  # growth): they made the first kind look 30 % slower
        log.info("estimate: warm-up with %d steps of %s (not counted)", steps, r.name)
        try:
            probe(r, "warm-up")
        except Exception:  # noqa: BLE001 - the same probe fails below, and says so
            pass
    for k, (key, r) in enumerate(ordered, 1):
        log.info("[%d/%d] estimate: %d steps of %s", k, len(probes), steps, r.name)
        try:
            summary = probe(r, r.name)
        except Exception as e:  # noqa: BLE001 - that kind of run shows as failed
            log.error("estimate of %s failed: %s", r.name, e)
            continue
        rate[key] = summary["samples_per_s"]
        cfg = compose_config(r.overrides)
        n_train[key] = len(load_data(cfg.data, cfg.seed).train)
    return rate, n_train
