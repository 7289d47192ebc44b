"""Does the per-message optimizer step slow down when several stages step at once?

A SID stage runs a full optimizer step per message; Adam streams parameters, gradients and
both moments through memory (~28 bytes per parameter) and so is bandwidth-bound, unlike the
stage's matmuls. The GPU/16-core investigation listed "per-message optimizer updates
contending for memory bandwidth" as a candidate for poor CPU scaling at S=4 on 16 cores.
This runs N processes at once, each pinned to its own core(s) like pipeline stages with
pipeline.cpu_affinity=true,
and times a fused Adam step over one bench_mlp stage's parameters (4 x 1024 x 1024) and, as
a compute-bound control, the stage's 32-sample matmul.

    python benchmarks/optimizer_contention.py --procs 1 2      # markdown table on stdout
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def worker(cores: set[int], threads: int, iters: int, barrier, queue) -> None:
    os.sched_setaffinity(0, cores)
    import torch

    torch.set_num_threads(threads)
    params = [torch.nn.Parameter(torch.randn(1024, 1024)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    x, w = torch.randn(32, 1024), torch.randn(1024, 1024)
    for _ in range(5):
        opt.step()
        x @ w
    barrier.wait()  # every process times the same window
    t0 = time.perf_counter()
    for _ in range(iters):
        opt.step()
    adam = (time.perf_counter() - t0) / iters
    t0 = time.perf_counter()
    for _ in range(4 * iters):
        x @ w
    matmul = (time.perf_counter() - t0) / (4 * iters)
    queue.put((adam, matmul))


def run(procs: int, threads: int, iters: int) -> tuple[float, float]:
    """Mean per-process Adam-step and matmul seconds with `procs` processes at once."""
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(procs)
    workers = [
        ctx.Process(target=worker, args=(set(range(i * threads, (i + 1) * threads)), threads,
                                         iters, barrier, queue))
        for i in range(procs)
    ]  # fmt: skip
    for w in workers:
        w.start()
    timed = [queue.get(timeout=300) for _ in range(procs)]
    for w in workers:
        w.join()
    return sum(a for a, _ in timed) / procs, sum(m for _, m in timed) / procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="threads (cores) per process")
    ap.add_argument("--iters", type=int, default=60)
    args = ap.parse_args()
    if max(args.procs) * args.threads > len(os.sched_getaffinity(0)):
        raise SystemExit(f"needs {max(args.procs) * args.threads} cores")
    print("| processes at once | Adam step [ms] | slowdown | 32x1024 matmul [ms] | slowdown |")
    print("|---|---|---|---|---|")
    base = None
    for n in args.procs:
        adam, mm = run(n, args.threads, args.iters)
        base = base or (adam, mm)
        print(f"| {n} | {adam * 1e3:.2f} | {adam / base[0]:.2f} | {mm * 1e3:.3f} | "
              f"{mm / base[1]:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
