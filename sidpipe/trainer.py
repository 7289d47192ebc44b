"""Single-process trainers: SID `blockwise`, SID `shared` (the reference algorithm) and BP.

`train_single(cfg, run_dir)` is the exact sequential reference for the pipelines: the
blockwise trainer runs one `SIDStage` over every block; the BP trainer accumulates gradients
over `pipeline.microbatches` microbatches per batch, as the GPipe/1F1B schedules do.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidpipe import checkpoint
from sidpipe.config import Config, Method, Variant, to_dict
from sidpipe.data import Batches, DataBundle, load_data
from sidpipe.logger import make_logger
from sidpipe.loss import at_least_fp32, sid_loss
from sidpipe.memory import MemoryProbe
from sidpipe.metrics import atomic_write_json, save_state
from sidpipe.models import BlockNet, build_model
from sidpipe.models.heads import uniform_prior
from sidpipe.models.partition import StageModule
from sidpipe.models.shared import SharedSIDNet
from sidpipe.pipeline.trace import Tracer, chrome_trace
from sidpipe.stage import SIDStage, autocast, build_optimizer

log = logging.getLogger("sidpipe")


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, ...): the message names the step and the reason."""


def select_device(cfg: Config, local_rank: int = 0) -> torch.device:
    want = cfg.device.value
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            "device=cuda was asked for but CUDA is not available; use device=cpu or auto"
        )
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def build_net(cfg: Config, data: DataBundle) -> nn.Module:
    """The same seed gives the same initial parameters on every rank and in the reference."""
    torch.manual_seed(cfg.seed)
    if cfg.sid.variant is Variant.shared:
        return SharedSIDNet(data.in_shape, data.num_classes, n_modules=cfg.sid.modules)
    return build_model(cfg.model, data.in_shape, data.num_classes)


def steps_per_epoch(cfg: Config, data: DataBundle) -> int:
    return math.ceil(len(data.train) / cfg.train.batch_size)


def total_steps(cfg: Config, data: DataBundle) -> int:
    n = cfg.train.epochs * steps_per_epoch(cfg, data)
    return min(n, cfg.train.max_steps) if cfg.train.max_steps else n


def train_batches(
    cfg: Config, data: DataBundle, device: torch.device | None = None, drop_last: bool = False
) -> Batches:
    """device: keep the images there once (a GPU slices, augments and normalises its own
    batches; no per-batch host work or copy). Same values as on the CPU."""
    device = device if cfg.train.data_on_device else None
    return Batches(
        data.train, data, cfg.train.batch_size, shuffle=True, seed=cfg.seed,
        augment=data.augment, drop_last=drop_last, device=device,
    )  # fmt: skip


def eval_splits(
    cfg: Config, data: DataBundle, device: torch.device | None = None
) -> dict[str, Batches]:
    device = device if cfg.train.data_on_device else None
    splits = {"test": data.test} | ({"val": data.val} if data.val is not None else {})
    return {
        name: Batches(split, data, cfg.train.eval_batch_size, False, cfg.seed, device=device)
        for name, split in splits.items()
    }


# --------------------------------------------------------------------------------------
# The three single-process methods: a step function and a per-depth evaluation each.


class BlockwiseSID:
    def __init__(self, cfg: Config, net: BlockNet, total: int, device: torch.device):
        self.net = net.to(device)
        self.device = device
        self.stage = SIDStage(StageModule(net, range(net.n_blocks)), cfg, total, device)
        self.optimizers, self.schedulers = self.stage.optimizers, self.stage.schedulers

    @property
    def counters(self) -> dict[str, int]:
        return {"messages": self.stage.messages}

    def set_counters(self, c: dict[str, int]) -> None:
        self.stage.messages = c["messages"]

    def step(self, x: Tensor, y: Tensor) -> list[Tensor]:
        p0 = uniform_prior(x.shape[0], self.net.num_classes, x.device)
        _, _, losses, _ = self.stage.forward(x, p0, y)
        self.stage.update(losses)
        return [loss.detach() for loss in losses]

    def logits(self, x: Tensor) -> list[Tensor]:
        p0 = uniform_prior(x.shape[0], self.net.num_classes, x.device)
        return self.stage.eval_forward(x, p0)[2]


class SharedSID:
    """The reference algorithm: two phases per batch, extractor trained by the summed losses."""

    def __init__(self, cfg: Config, net: SharedSIDNet, total: int, device: torch.device):
        self.cfg, self.net, self.device = cfg, net.to(device), device
        # One Adam for the extractor and one per module, as the reference code does.
        self.opts = [build_optimizer(net.extractor.parameters(), cfg.optim, total)]
        self.opts += [build_optimizer(m.parameters(), cfg.optim, total) for m in net.sid_modules]
        self.optimizers = [o for o, _ in self.opts]
        self.schedulers = [s for _, s in self.opts]

    def step(self, x: Tensor, y: Tensor) -> list[Tensor]:
        sid, net = self.cfg.sid, self.net
        net.train()
        with autocast(self.device, self.cfg.precision):
            z = net.extractor(x)
            # Phase 1: teacher beliefs with the current parameters, no gradient.
            with torch.no_grad():
                dtype = torch.promote_types(z.dtype, torch.float32)
                beliefs = [uniform_prior(x.shape[0], net.num_classes, x.device, dtype)]
                for g in net.sid_modules:
                    logits = g(torch.cat([beliefs[-1], z.detach()], 1))
                    beliefs.append(F.softmax(at_least_fp32(logits), 1))
            # Phase 2: every module fits its own loss given the detached previous belief.
            losses = [
                sid_loss(
                    g(torch.cat([beliefs[i], z], 1)),
                    y,
                    beliefs[i],
                    sid.alpha,
                    sid.kl_direction,
                    sid.label_smoothing,
                )
                for i, g in enumerate(net.sid_modules)
            ]
        for opt, _ in self.opts:
            opt.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()
        for opt, sched in self.opts:
            opt.step()
            if sched is not None:
                sched.step()
        return [loss.detach() for loss in losses]

    @torch.no_grad()
    def logits(self, x: Tensor) -> list[Tensor]:
        self.net.eval()
        with autocast(self.device, self.cfg.precision):
            return [z.float() for z in self.net(x)]


class Backprop:
    """End-to-end cross-entropy on the last head, gradients accumulated over microbatches."""

    def __init__(self, cfg: Config, net: nn.Module, total: int, device: torch.device):
        self.cfg, self.net, self.device = cfg, net.to(device), device
        if isinstance(net, SharedSIDNet):  # the reference repo's BP network: the same chain
            params = list(net.parameters())
            self._fwd = lambda x: net(x)[-1]
        else:
            params = [p for b in net.blocks for p in b.parameters()] + list(
                net.heads[-1].parameters()
            )
            self._fwd = net.bp_forward
        self.opt, self.sched = build_optimizer(params, cfg.optim, total)
        self.optimizers, self.schedulers = [self.opt], [self.sched]

    def step(self, x: Tensor, y: Tensor) -> list[Tensor]:
        self.net.train()
        m = min(self.cfg.pipeline.microbatches, x.shape[0])
        total = torch.zeros((), device=x.device)
        for xm, ym in zip(x.tensor_split(m), y.tensor_split(m)):
            with autocast(self.device, self.cfg.precision):
                loss = F.cross_entropy(self._fwd(xm).float(), ym)
            (loss / m).backward()
            total += loss.detach() / m
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sched is not None:
            self.sched.step()
        return [total]

    @torch.no_grad()
    def logits(self, x: Tensor) -> list[Tensor]:
        self.net.eval()
        with autocast(self.device, self.cfg.precision):
            return [self._fwd(x).float()]


def sched_state(sched: Any) -> dict[str, Any] | None:
    """A scheduler's counters (its lambdas are code: rebuilt from the config, not saved)."""
    if sched is None:
        return None

    def plain(v: Any) -> Any:  # a graph-safe optimizer's lr is a tensor: JSON wants floats
        if isinstance(v, Tensor):
            return float(v)
        return [plain(x) for x in v] if isinstance(v, list) else v

    return {k: plain(v) for k, v in sched.state_dict().items() if k != "lr_lambdas"}


def restore_schedulers(schedulers: list[Any], states: list[dict[str, Any] | None]) -> None:
    for sched, state in zip(schedulers, states, strict=True):
        if sched is not None and state is not None:
            sched.load_state_dict({**sched.state_dict(), **state})


def make_method(cfg: Config, net: nn.Module, total: int, device: torch.device):
    if cfg.method is Method.bp:
        return Backprop(cfg, net, total, device)
    if cfg.sid.variant is Variant.shared:
        return SharedSID(cfg, net, total, device)
    return BlockwiseSID(cfg, net, total, device)


def evaluate(method: Any, batches: Batches, device: torch.device) -> list[float]:
    """Accuracy of every depth's belief (the last entry is the network's prediction)."""
    correct: Tensor | None = None
    n = 0
    for x, y in batches.epoch(0):
        x, y = x.to(device), y.to(device)
        hits = torch.stack([(z.argmax(-1) == y).sum() for z in method.logits(x)])
        correct = hits if correct is None else correct + hits
        n += y.numel()
    assert correct is not None, "empty evaluation split"
    return (correct.double() / n).tolist()


# --------------------------------------------------------------------------------------
# Run bookkeeping shared by single-process and pipelined runs.


@dataclass
class History:
    """Per-epoch evaluations; picks last, best-on-test and validation-selected accuracy."""

    epochs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.epochs.append(record)

    def selection(self) -> dict[str, Any]:
        if not self.epochs:
            return {}
        best_test = max(self.epochs, key=lambda r: r["test_per_depth"][-1])
        out = {
            "best_epoch_test_accuracy": best_test["test_per_depth"][-1],
            "best_epoch": best_test["epoch"],
        }
        with_val = [r for r in self.epochs if "val_per_depth" in r]
        if with_val:
            chosen = max(with_val, key=lambda r: r["val_per_depth"][-1])
            out["val_selected_epoch"] = chosen["epoch"]
            out["val_selected_test_accuracy"] = chosen["test_per_depth"][-1]
            out["val_accuracy"] = chosen["val_per_depth"][-1]
        return out


def write_summary(
    run_dir: Path, cfg: Config, noise_rate: float, result: dict[str, Any]
) -> dict[str, Any]:
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


def progress_enabled(cfg: Config) -> bool:
    return cfg.progress if cfg.progress is not None else sys.stderr.isatty()


def train_single(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Train in this process and write summary.json + metrics.jsonl into run_dir."""
    from sidpipe.pipeline.dist import set_threads

    previous = set_threads(cfg, 0)
    try:
        return _train_single(cfg, run_dir)
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)


def _train_single(cfg: Config, run_dir: Path) -> dict[str, Any]:
    device = select_device(cfg)
    data = load_data(cfg.data, cfg.seed)
    if data.noise_rate:
        log.info(
            "label noise: realised rate %.4f on %d training labels",
            data.noise_rate,
            len(data.train),
        )
    batches, splits = train_batches(cfg, data, device), eval_splits(cfg, data, device)
    memory = MemoryProbe(device)  # baseline before the model exists (after the data)
    net = build_net(cfg, data)
    memory.attach(net.blocks if isinstance(net, BlockNet) else nn.ModuleList([net.extractor]))
    n_steps = total_steps(cfg, data)
    updates = n_steps // (cfg.sid.accumulate_steps if cfg.method is Method.sid else 1)
    method = make_method(cfg, net, max(1, updates), device)
    metrics = make_logger(run_dir, to_dict(cfg), cfg.logger)
    history = History()
    started = time.perf_counter()
    bar = None
    if progress_enabled(cfg):
        from tqdm import tqdm

        bar = tqdm(total=n_steps, desc=f"{cfg.method.value} train", unit="step")
    tracer = Tracer(0, enabled=cfg.pipeline.trace)
    every = cfg.train.eval_every_steps
    step, samples, train_s = 0, 0, 0.0
    epoch, start = 0, 0
    module = method.stage.stage if isinstance(method, BlockwiseSID) else method.net
    n_parts = net.n_blocks if isinstance(net, BlockNet) else net.n_modules
    meta = {"stages": 1, "method": cfg.method.value, "partition": [[0, n_parts]],
            "config": to_dict(cfg)}  # fmt: skip
    resume = checkpoint.resolve_resume(cfg, run_dir)
    if resume is not None:
        checkpoint.check_compatible(checkpoint.verify(resume), cfg, meta["partition"], resume)
        extra = checkpoint.load(resume, 0, module, method.optimizers)
        step, samples, train_s = extra["step"], extra["samples"], extra["train_s"]
        epoch, start = extra["epoch"], extra["batch"]
        history.epochs = extra["history"]
        restore_schedulers(method.schedulers, extra["schedulers"])
        if hasattr(method, "set_counters"):
            method.set_counters(extra["counters"])
        log.info("resumed from %s at step %d", resume, step)
        if bar is not None:
            bar.update(step)

    def evaluation(epoch: int) -> None:
        record: dict[str, Any] = {"kind": "eval", "step": step, "epoch": epoch, "train_s": train_s}
        for name, split in splits.items():
            record[f"{name}_per_depth"] = evaluate(method, split, device)
        history.add(record)
        metrics.log(record)
        if bar is None:
            val = f" val {record['val_per_depth'][-1]:.4f}" if "val_per_depth" in record else ""
            log.info(
                "epoch %d step %d: test accuracy %.4f%s",
                epoch,
                step,
                record["test_per_depth"][-1],
                val,
            )

    while step < n_steps:
        for i, (x, y) in enumerate(batches.epoch(epoch, start=start), start=start):
            t0 = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            losses = method.step(x, y)
            memory.sample()
            step += 1
            samples += y.numel()
            if step % cfg.train.log_every == 0 or step == n_steps:
                loss_vals = [float(v) for v in losses]  # the only host sync, at log intervals
                for v in loss_vals:
                    if not math.isfinite(v):
                        raise TrainingError(f"non-finite loss {v} at step {step} (epoch {epoch})")
                metrics.log({"kind": "train", "step": step, "epoch": epoch, "loss": loss_vals})
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_vals[-1]:.4f}")
            t1 = time.perf_counter()
            train_s += t1 - t0
            tracer.add("train", t0, t1, n=int(y.numel()))
            if bar is not None:
                bar.update(1)
            if cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0:
                extra = {"step": step, "samples": samples, "train_s": train_s, "epoch": epoch,
                         "batch": i + 1, "history": history.epochs,
                         "schedulers": [sched_state(s) for s in method.schedulers],
                         "counters": getattr(method, "counters", {})}  # fmt: skip
                root = checkpoint.checkpoint_root(cfg, run_dir)
                checkpoint.save(root, step, 0, 1, module, method.optimizers, extra, meta,
                                cfg.checkpoint.keep_last)  # fmt: skip
            if step >= n_steps:
                break
            if every and step % every == 0:
                evaluation(epoch)
        start = 0
        done = step >= n_steps
        if cfg.train.eval_every_epoch and not done or done and cfg.train.final_eval:
            evaluation(epoch)
        epoch += 1
    if bar is not None:
        bar.close()
    if cfg.pipeline.trace:
        atomic_write_json(run_dir / "trace.json", chrome_trace([tracer.events()]))
    save_state(net.state_dict(), run_dir, 0)
    final = history.epochs[-1] if history.epochs else {}
    result = {
        "test_accuracy": final["test_per_depth"][-1] if final else None,
        "per_depth_accuracy": final.get("test_per_depth", []),
        **history.selection(),
        "evaluations": history.epochs,
        "epochs_run": epoch,
        "steps": step,
        "samples_per_s": samples / train_s if train_s > 0 else 0.0,
        "wall_s": time.perf_counter() - started,
        "train_s": train_s,
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
