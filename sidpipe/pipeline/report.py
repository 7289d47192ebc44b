"""End of a pipeline run: gather every stage's numbers on rank 0, write summary.json and trace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from sidpipe.config import Config
from sidpipe.metrics import atomic_write_json
from sidpipe.pipeline.dist import DistContext
from sidpipe.pipeline.trace import chrome_trace
from sidpipe.trainer import History, write_summary

AUTO_PLAN_FILE = "partition_auto.json"  # pipeline.partition=auto: measured, chosen, predicted


def handover(runner: Any) -> dict[str, Any]:
    """What every stage runner (SID or BP) hands rank 0 beside its public per-stage numbers:
    the '_' entries gather_and_write reads and leaves out of the summary's per_stage."""
    return {
        "_train_samples": runner.train_samples,
        "_label_noise_rate": runner.data.noise_rate,
        "_train_s": runner.train_s,
        "_history": runner.history.epochs if runner.last else None,
        "_trace": runner.tracer.events(),
    }


def gather_and_write(
    ctx: DistContext, cfg: Config, run_dir: Path, result: dict[str, Any]
) -> dict[str, Any]:
    """Collective: only reached when every stage finished cleanly. Returns the summary on rank 0."""
    gathered: list[dict[str, Any]] | None = (
        [{} for _ in range(ctx.world)] if ctx.rank == 0 else None
    )
    dist.gather_object(result, gathered, dst=0)
    if ctx.rank != 0:
        return {}
    assert gathered is not None
    last = gathered[-1]
    history = History(last["_history"] or [])
    if not history.epochs and (cfg.train.final_eval or cfg.train.eval_every_epoch):
        raise RuntimeError("the last stage reported no evaluation")
    final = history.epochs[-1] if history.epochs else {}
    if cfg.pipeline.trace:
        atomic_write_json(run_dir / "trace.json", chrome_trace([g["_trace"] for g in gathered]))
    samples, train_s = last["_train_samples"], last["_train_s"]
    per_stage = [{k: v for k, v in g.items() if not k.startswith("_")} for g in gathered]
    summary = {
        "test_accuracy": final["test_per_depth"][-1] if final else None,
        "per_depth_accuracy": final.get("test_per_depth", []),
        **history.selection(),
        "evaluations": history.epochs,
        "steps": last["train_messages"],
        "samples_per_s": samples / train_s if train_s > 0 else 0.0,
        "wall_s": max(g["wall_s"] for g in gathered),
        "train_s": train_s,
        "backend": ctx.backend,
        "device": str(ctx.device.type),
        "per_stage": per_stage,
    }
    plan_path = run_dir / AUTO_PLAN_FILE
    if plan_path.exists():  # this run's plan (a stale one from another layout is left out)
        plan = json.loads(plan_path.read_text())
        if plan["cuts"] == list(cfg.pipeline.partition or []):
            plan["measured_stage_ms"] = [st.get("train_step_ms") for st in per_stage]
            summary["partition_auto"] = plan
    # the noise rate rank 0 realised on its training labels: no second load of the dataset
    return write_summary(run_dir, cfg, gathered[0]["_label_noise_rate"], summary)
