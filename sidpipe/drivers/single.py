"""The single-process driver: SID `blockwise`, SID `shared` (the reference algorithm) and BP.

`train_single(cfg, run_dir)` is the exact sequential reference for the pipelines: the
blockwise method runs one `SIDLearner` over every block; BP accumulates gradients over
`pipeline.microbatches` microbatches per batch, as the pipeline schedules do. The loop
consumes the same run cadence as the pipeline runners (docs/design.md §4).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from torch import nn

from sidpipe.config import Config, Method, to_dict
from sidpipe.data import eval_splits, load_data, text_bytes_per_token, train_batches
from sidpipe.drivers.runner import LossMeter
from sidpipe.drivers.summary import write_summary
from sidpipe.errors import Preempted
from sidpipe.method.step import BlockwiseSID, evaluate_split, make_method
from sidpipe.models import BlockNet, build_net
from sidpipe.runtime.cadence import (
    Event,
    EventKind,
    RunState,
    cadence,
    preemptible,
    run_cadence,
    total_steps,
)
from sidpipe.runtime.checkpoint import CheckpointManager, latest_good
from sidpipe.runtime.device import select_device, set_threads
from sidpipe.runtime.io import atomic_write_json, save_state
from sidpipe.runtime.logger import make_logger
from sidpipe.runtime.memory import MemoryProbe
from sidpipe.runtime.preempt import Preemption
from sidpipe.runtime.resume import check_not_past
from sidpipe.runtime.trace import Span, Tracer, chrome_trace
from sidpipe.tokenizer import keep_in_run

log = logging.getLogger("sidpipe")


def progress_enabled(cfg: Config) -> bool:
    return cfg.progress if cfg.progress is not None else sys.stderr.isatty()


def train_single(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Train in this process and write summary.json + metrics.jsonl into run_dir."""
    previous = set_threads(cfg, 0)
    preemption = Preemption().install()  # SIGUSR1 / SIGTERM: save and stop (runtime/preempt.py)
    try:
        return _train_single(cfg, run_dir, preemption)
    finally:
        preemption.uninstall()
        if previous is not None:
            os.sched_setaffinity(0, previous)


def _train_single(cfg: Config, run_dir: Path, preemption: Preemption) -> dict[str, Any]:
    device = select_device(cfg)
    data = load_data(cfg.data, cfg.seed)
    if data.tokenizer is not None:  # the run keeps its tokenizer (export carries it)
        keep_in_run(data.tokenizer, run_dir)
    if data.noise_rate:
        log.info("label noise: realised rate %.4f on %d training labels",
                 data.noise_rate, len(data.train))  # fmt: skip
    batches, splits = train_batches(cfg, data, device), eval_splits(cfg, data, device)
    memory = MemoryProbe(device)  # baseline before the model exists (after the data)
    net = build_net(cfg, data)
    memory.attach(net.blocks if isinstance(net, BlockNet) else nn.ModuleList([net.extractor]))
    n_steps = total_steps(cfg, data)
    updates = n_steps // (cfg.sid.accumulate_steps if cfg.method is Method.sid else 1)
    method = make_method(cfg, net, max(1, updates), device)
    module = method.learner.stage if isinstance(method, BlockwiseSID) else method.net
    n_parts = net.n_blocks if isinstance(net, BlockNet) else net.n_modules
    checkpoints = CheckpointManager(cfg, run_dir, [[0, n_parts]])
    metrics = make_logger(run_dir, to_dict(cfg), cfg.logger)
    started = time.perf_counter()
    state = RunState()
    restored = checkpoints.restore(module, method.optimizers, method.schedulers)
    if restored is not None:
        state, path = restored
        check_not_past(path, state.step, n_steps)
        method.messages = state.messages
        log.info("resumed from %s at step %d", path, state.step)
    bar = None
    if progress_enabled(cfg):
        from tqdm import tqdm

        bar = tqdm(total=n_steps, initial=state.step, desc=f"{cfg.method.value} train", unit="step")
    tracer = Tracer(0, enabled=cfg.pipeline.trace)
    losses = LossMeter(1 if cfg.method is Method.bp else n_parts, device)
    lm = getattr(net, "per_position", False)  # a language model: bits per byte too

    def log_train(ev: Event) -> None:
        mean = losses.mean(f"step {ev.step} (epoch {ev.epoch})")
        if mean is not None:
            metrics.log({"kind": "train", "step": ev.step, "epoch": ev.epoch, "loss": mean})
            if bar is not None:
                bar.set_postfix(loss=f"{mean[-1]:.4f}")

    def evaluation(step: int, epoch: int) -> None:
        record: dict[str, Any] = {"kind": "eval", "step": step, "epoch": epoch,
                                  "train_s": state.train_s}  # fmt: skip
        for name, split in splits.items():
            scores = evaluate_split(method, split, device)
            record[f"{name}_per_depth"] = scores["accuracy"]
            if lm:
                record[f"{name}_bpb_per_depth"] = scores["bits"]
        state.history.add(record)
        metrics.log(record)
        if bar is None:
            val = f" val {record['val_per_depth'][-1]:.4f}" if "val_per_depth" in record else ""
            if lm:
                val += f"; test bits/byte {record['test_bpb_per_depth'][-1]:.4f}"
            log.info("epoch %d step %d: test accuracy %.4f%s",
                     epoch, step, record["test_per_depth"][-1], val)  # fmt: skip

    def train(ev: Event) -> None:
        t0 = time.perf_counter()
        x, y = ev.x.to(device, non_blocking=True), ev.y.to(device, non_blocking=True)
        losses.add(method.step(x, y))
        memory.sample()
        state.samples += y.shape[0]  # samples: images, or windows of a text
        if ev.step % cfg.train.log_every == 0:
            log_train(ev)
        tracer.add(Span.TRAIN, t0, time.perf_counter(), n=int(y.shape[0]))
        if bar is not None:
            bar.update(1)

    def checkpoint(ev: Event) -> None:
        state.messages = getattr(method, "messages", 0)
        checkpoints.save(state, module, method.optimizers, method.schedulers)

    events = cadence(cfg.train, cfg.checkpoint.every_n_steps, n_steps, state.position,
                     batches.epoch)  # fmt: skip
    on = {
        EventKind.TRAIN: train,
        EventKind.CHECKPOINT: checkpoint,
        EventKind.EVAL: lambda ev: evaluation(ev.step, ev.epoch),
        EventKind.EPOCH_END: log_train,
    }
    last = run_cadence(preemptible(events, lambda _: preemption.requested(), state.step), on, state)
    preempted = last.kind is EventKind.PREEMPT
    if bar is not None:
        bar.close()
    if preempted:
        metrics.close()
        saved = latest_good(checkpoints.root)
        raise Preempted(preemption.signame, state.step, str(saved) if saved else None)
    if cfg.pipeline.trace:
        atomic_write_json(run_dir / "trace.json", chrome_trace([tracer.events()]))
    save_state(net.state_dict(), run_dir, 0)
    history = state.history
    final = history.epochs[-1] if history.epochs else {}
    result = {
        "test_accuracy": final["test_per_depth"][-1] if final else None,
        "per_depth_accuracy": final.get("test_per_depth", []),
        **history.selection(),
        "evaluations": history.epochs,
        "epochs_run": state.epoch,
        "steps": state.step,
        "samples_per_s": state.samples / state.train_s if state.train_s > 0 else 0.0,
        "wall_s": time.perf_counter() - started,
        "train_s": state.train_s,
        "_text_bytes_per_token": text_bytes_per_token(data),
        "per_stage": [
            {
                "stage": 0,
                "busy_fraction": 1.0,
                "recv_wait_fraction": 0.0,
                "bytes_sent_forward": 0,
                "bytes_sent_backward": 0,
                **memory.report(),
            }
        ],
    }
    summary = write_summary(run_dir, cfg, data.noise_rate, result)
    metrics.summary(summary)
    metrics.close()
    return summary
