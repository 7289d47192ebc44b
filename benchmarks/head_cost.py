"""What a belief head costs: its share of a pipeline stage's SID step (issue 27).

ResNet-18 and VGG-11 at model.width=8 on CIFAR-10 shapes (3x32x32, 10 classes), batch 128,
cut into B blocks with one block per stage, for every model.head. For each stage:

  step   the whole SID message as partition=auto and the simulator time it
         (sidpipe.drivers.balance.message_step): block + head + loss forward, local
         backward, fused Adam step
  head   the head's part of that step alone: head + loss forward, backward (into the head's
         parameters and its input h, as in the whole step), Adam step of the head's
         parameters

share = head / step, in measured ms (median of --reps after warm-up, one torch thread, this
CPU) and in FLOPs (torch.utils.flop_counter.FlopCounterMode over one step; it counts
matmuls and convolutions, not BatchNorm or elementwise work, hence two views).
The table gives every stage's share, the largest, and the heads' share of the whole
network's SID step (what a single-process run pays). Issue 27's bar: <= 15% at B=4.

Usage: python benchmarks/head_cost.py [--blocks 2 4 8] [--reps 7] [--head-width 32]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from sidpipe.config import HEAD_KINDS, Config, DataConfig, ModelConfig, TrainConfig
from sidpipe.drivers.balance import message_step
from sidpipe.method.learner import SIDLearner, build_optimizer
from sidpipe.method.loss import sid_loss
from sidpipe.models import build_model
from sidpipe.models.partition import Stage

SHAPE, CLASSES = (3, 32, 32), 10


def flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_ms(fns: list[Callable[[], None]], reps: int, warmup: int = 2) -> list[float]:
    """Median ms of each fn, timed in alternation round by round, so a neighbour's load
    drifting over the run weighs on both sides of a ratio alike."""
    for _ in range(warmup):  # allocator, lazy optimizer state
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def head_step(cfg: Config, head: torch.nn.Module, h, p, y) -> Callable[[], None]:
    """The head's part of a SID message: forward + loss, backward into its parameters and its
    input (the block's output, which the whole step backpropagates through), Adam step."""
    h = h.detach().requires_grad_(True)
    opt, _ = build_optimizer(head.parameters(), cfg.optim, total_steps=1000)
    sid = cfg.sid

    def step() -> None:
        h.grad = None
        z = head(h, p)
        sid_loss(z, y, p, sid.alpha, sid.kl_direction, sid.label_smoothing).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(model: str, blocks: int, head: str, width: int, batch: int, reps: int) -> list[dict]:
    cfg = Config(
        model=ModelConfig(name=model, width=8, blocks=blocks, head=head, head_width=width),
        data=DataConfig(name="cifar10"),
        train=TrainConfig(batch_size=batch),
    )
    torch.manual_seed(0)
    net = build_model(cfg.model, SHAPE, CLASSES)
    h = torch.randn(batch, *SHAPE)
    y = torch.randint(0, CLASSES, (batch,))
    p = net.prior(h)
    rows = []
    for i in range(blocks):
        stage = SIDLearner(Stage(net, range(i, i + 1)), cfg, 1000, torch.device("cpu"))
        whole, out = message_step(stage, h, p, y)
        step_flops = flops(whole)
        h_out, p_out = out["fwd"][0], out["fwd"][1]  # the block's output: the head's input
        part = head_step(cfg, net.heads[i], h_out, p, y)
        step_ms, head_ms = median_ms([whole, part], reps)
        rows.append(
            {
                "step_ms": step_ms,
                "head_ms": head_ms,
                "step_flops": step_flops,
                "head_flops": flops(part),
            }
        )
        h, p = h_out, p_out
    return rows


def pct(values: list[float]) -> str:
    return "/".join(f"{100 * v:.0f}" for v in values) + f" (max {100 * max(values):.0f}%)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "vgg11"])
    ap.add_argument("--blocks", nargs="+", type=int, default=[4, 2, 8])
    ap.add_argument("--heads", nargs="+", default=list(HEAD_KINDS), choices=HEAD_KINDS)
    ap.add_argument("--head-width", type=int, default=ModelConfig.head_width)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"{platform.machine()}, torch {torch.__version__}, 1 thread, batch {args.batch}, "
        f"model.width=8, model.head_width={args.head_width}, median of {args.reps}"
    )
    print(
        "| model | blocks | head | stage step ms | head share of step, ms % per stage "
        "| head share, FLOPs % per stage | whole net: heads' share, ms / FLOPs |"
    )
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        for blocks in args.blocks:
            for head in args.heads:
                rows = measure(model, blocks, head, args.head_width, args.batch, args.reps)
                steps = "/".join(f"{r['step_ms']:.1f}" for r in rows)
                ms = pct([r["head_ms"] / r["step_ms"] for r in rows])
                fl = pct([r["head_flops"] / r["step_flops"] for r in rows])
                total = [sum(r[f"head_{k}"] for r in rows) / sum(r[f"step_{k}"] for r in rows)
                         for k in ("ms", "flops")]  # fmt: skip
                whole = f"{100 * total[0]:.0f}% / {100 * total[1]:.0f}%"
                print(
                    f"| {model} | {blocks} | {head} | {steps} | {ms} | {fl} | {whole} |", flush=True
                )


if __name__ == "__main__":
    main()
