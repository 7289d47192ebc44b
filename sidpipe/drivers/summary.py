"""End of a run: gather every stage's numbers on rank 0, write summary.json, the trace, and
the short human-readable report printed at the end (`format_report`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sidpipe.config import TEXT_DATASETS, Config, Method, text_vocab, to_dict
from sidpipe.runtime.cadence import History
from sidpipe.runtime.dist import DistContext
from sidpipe.runtime.io import atomic_write_json, mib
from sidpipe.runtime.trace import chrome_trace

AUTO_PLAN_FILE = "partition_auto.json"  # pipeline.partition=auto: measured, chosen, predicted


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
    last = next(g for g in gathered if g["_sink"])  # the rank holding the last stage
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
        "_text_bytes_per_token": last.get("_text_bytes_per_token"),
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


def language_numbers(cfg: Config, result: dict[str, Any]) -> dict[str, Any]:
    """A language model's headline numbers: bits per byte of every depth on the test and
    validation splits (last evaluation) and tokens/s (a sample is a window of data.context
    tokens, each a prediction)."""
    evals = result.get("evaluations") or []
    final = evals[-1] if evals else {}
    if cfg.data.name not in TEXT_DATASETS:
        return {}
    bpb = final.get("test_bpb_per_depth", [])
    tokens_per_s = result.get("samples_per_s", 0.0) * cfg.data.context
    per_token = result.get("_text_bytes_per_token") or 1.0
    return {
        "test_bpb": bpb[-1] if bpb else None,
        "per_depth_bpb": bpb,
        "val_bpb_per_depth": final.get("val_bpb_per_depth", []),
        "tokens_per_s": tokens_per_s,
        # what compares across tokenizers: a BPE token stands for several bytes of text
        # (the training split's mean), a byte for one
        "text_bytes_per_token": per_token,
        "text_bytes_per_s": tokens_per_s * per_token,
        "tokenizer": cfg.data.tokenizer,
        "vocab_size": text_vocab(cfg.data),
        "context": cfg.data.context,
    }


def write_summary(
    run_dir: Path, cfg: Config, noise_rate: float, result: dict[str, Any]
) -> dict[str, Any]:
    result = {**result, **language_numbers(cfg, result)}
    result = {k: v for k, v in result.items() if not k.startswith("_")}  # private to drivers
    summary = {
        "method": cfg.method.value,
        "variant": cfg.sid.variant.value if cfg.method is Method.sid else None,
        "stages": cfg.pipeline.stages,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "precision": cfg.precision.value,
        "seed": cfg.seed,
        "label_noise_rate": noise_rate,
        **result,
        "config": to_dict(cfg),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def format_report(s: dict[str, Any]) -> str:
    variant = f"/{s['variant']}" if s.get("variant") else ""
    lines = [
        f"== sidpipe: {s['method']}{variant}, {s['stages']} stage(s), "
        f"{s['model']} on {s['data']} ==",
        "test accuracy (last module): "
        + ("not evaluated" if s["test_accuracy"] is None else f"{s['test_accuracy']:.4f}"),
        "accuracy per depth: " + " ".join(f"{a:.3f}" for a in s["per_depth_accuracy"]),
        f"throughput: {s['samples_per_s']:.0f} samples/s   wall: {s['wall_s']:.1f} s",
    ]
    if s.get("per_depth_bpb"):  # a language model
        lines[1:2] = ["test bits/byte (last module): " + f"{s['test_bpb']:.4f}",
                      "bits/byte per depth: " + " ".join(f"{b:.3f}" for b in s["per_depth_bpb"]),
                      f"next-{'token' if s.get('tokenizer') == 'bpe' else 'byte'} "
                      + lines[1]]  # fmt: skip
        lines[-1] += f"   ({s['tokens_per_s']:.0f} tokens/s)"
    plan = s.get("partition_auto")
    if plan:
        lines.append(
            f"partition=auto {plan['cuts']}: per-message stage step [ms] predicted / measured: "
            + ", ".join(
                f"{p:.2f} / {m:.2f}" if m is not None else f"{p:.2f} / -"
                for p, m in zip(plan["predicted_stage_ms"], plan["measured_stage_ms"])
            )
        )
    for st in s.get("per_stage", []):
        lines.append(
            f"  stage {st['stage']}: busy {st['busy_fraction']:.2f}  "
            f"recv-wait {st.get('recv_wait_fraction', 0.0):.2f}  "
            f"recv {st.get('recv_fraction', 0.0):.2f}  "
            f"bytes fwd {mib(st['bytes_sent_forward'])} MiB  "
            f"bwd {mib(st['bytes_sent_backward'])} MiB  "
            f"tensors {mib(st.get('peak_tensor_memory_bytes', 0))} MiB "
            f"(RSS {mib(st['peak_memory_bytes'])} MiB)"
        )
    return "\n".join(lines)
