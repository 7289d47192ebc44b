"""Cost of a language model's belief head as the vocabulary grows (docs/design.md §9).

Two heads for (features h (N, d), previous belief p (N, V)) -> logits (N, V):
  token   sidpipe's TokenBeliefHead: U LN(h) + g * log p        O(dV) per position
  concat  the image heads' design, cat(h, p) -> Linear(d+V, V)    O((d+V)V) per position
Prints parameters and the median forward+backward time of each, one torch thread.
Usage: .venv/bin/python benchmarks/lm_head_cost.py [--rows 256] [--dim 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sidpipe.models.gpt import TokenBeliefHead


class ConcatHead(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim + vocab, vocab)

    def forward(self, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat((h, p), dim=-1))


def timed(head: nn.Module, h: torch.Tensor, p: torch.Tensor, reps: int = 5) -> float:
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        head(h, p).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3  # the first call warms up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"rows (positions) {args.rows}, d {args.dim}, torch {torch.__version__}")
    print("| V | token head params | concat head params | token ms | concat ms |")
    print("|---|---|---|---|---|")
    for vocab in (256, 2048, 8192):
        h = torch.randn(args.rows, args.dim)
        p = torch.randn(args.rows, vocab).softmax(-1)
        token, concat = TokenBeliefHead(args.dim, vocab), ConcatHead(args.dim, vocab)
        n_tok = sum(x.numel() for x in token.parameters())
        n_cat = sum(x.numel() for x in concat.parameters())
        print(
            f"| {vocab} | {n_tok:,} | {n_cat:,} | {timed(token, h, p):.2f} | "
            f"{timed(concat, h, p):.2f} |"
        )


if __name__ == "__main__":
    main()
