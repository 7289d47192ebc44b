"""Anytime inference: what SID's per-depth beliefs make possible (docs/design.md §9).

Every module's belief is a prediction, so a prediction may stop at the first module whose
belief is confident enough (its largest probability >= a threshold), per sample for a
classifier and per token for a language model. `exit_curve` measures quality against the
mean number of modules used over a set of thresholds; `generate` samples text that way.

For a causal language model the teacher-forced curve and generation agree exactly: the
belief at depth d for position t depends only on the prefix through depth d, and
`generate` recomputes the prefix through the modules it uses (no cache), so a token that
exits at depth d costs d modules' work, and no deeper module ever lacks an earlier position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidpipe.method.step import LN2
from sidpipe.models.heads import sparse_prior


def check_threshold(t: float) -> float:
    """An exit threshold is a probability in (0, 1]; anything else is a ValueError (one line)."""
    if not (isinstance(t, int | float) and 0.0 < t <= 1.0):
        raise ValueError(f"exit threshold {t!r} must be a probability in (0, 1]")
    return float(t)


def exit_depths(logits: Sequence[Tensor], threshold: float) -> Tensor:
    """1-based depth each prediction stops at: the first module whose belief's top
    probability reaches `threshold`, else the last. Shape: the logits' without the class dim."""
    conf = torch.stack([z.float().softmax(-1).amax(-1) for z in logits])  # (D, ...)
    ok = conf >= threshold
    ok[-1] = True  # the last module always answers
    return ok.to(torch.uint8).argmax(0) + 1  # argmax returns the first maximum


def exit_scores(logits: Sequence[Tensor], y: Tensor, threshold: float) -> Tensor:
    """[hits, count, nll in nats, summed depth] of early exit at `threshold`, float64."""
    depth = exit_depths(logits, threshold)
    stacked = torch.stack([z.float() for z in logits])  # (D, ..., K)
    index = (depth - 1)[None, ..., None].expand(1, *stacked.shape[1:])
    chosen = stacked.gather(0, index)[0].flatten(0, -2)  # the exiting module's logits
    y2 = y.flatten()
    return torch.stack([
        (chosen.argmax(-1) == y2).sum().double(),
        torch.tensor(float(y2.numel()), dtype=torch.float64, device=y.device),
        F.cross_entropy(chosen, y2, reduction="sum").double(),
        depth.sum().double(),
    ])  # fmt: skip


def exit_curve(
    method: Any, batches: Any, device: torch.device, thresholds: Sequence[float]
) -> list[dict[str, float]]:
    """Accuracy, bits per prediction and mean depth (modules used) for each threshold."""
    totals = torch.zeros(len(thresholds), 4, dtype=torch.float64)
    for x, y in batches.epoch(0):
        x, y = x.to(device), y.to(device)
        logits = method.logits(x)
        for i, t in enumerate(thresholds):
            totals[i] += exit_scores(logits, y, t).cpu()
    units = getattr(batches, "scored_bytes", None)  # text: bits per byte (method/step.py)
    return [
        {"threshold": float(t), "mean_depth": float(d / n), "accuracy": float(h / n),
         "bits": float(nll / (n if units is None else units) / LN2)}
        for t, (h, n, nll, d) in zip(thresholds, totals.tolist())
    ]  # fmt: skip


@torch.no_grad()
def generate(
    net: nn.Module,
    prompt: Tensor,
    n_tokens: int,
    depth: int | None = None,
    threshold: float | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    bp: bool = False,
) -> tuple[Tensor, list[int]]:
    """Sample n_tokens after `prompt` (1-D int64) from a BlockNet language model, each from
    module `depth` (1-based), or from the first module whose belief at the last position
    reaches `threshold`, else the last. Returns (all tokens, depth used per new token).
    bp: a BP-trained model, whose only trained exit is the last (bp_forward)."""
    net.eval()
    n_mod, context = len(net.blocks), int(net.in_shape[0])
    stop = n_mod if depth is None else depth
    seq, used = prompt.clone(), []
    for _ in range(n_tokens):
        h = seq[-context:][None]
        if bp:  # BP trains one exit: the final head, fed the uniform prior (bp_forward)
            z, i = net.bp_forward(h), n_mod - 1
        else:
            p = net.prior(h).float()
            for i in range(stop):
                if i:  # the priors the modules were trained on (pipeline.belief_topk)
                    p = sparse_prior(p, getattr(net, "belief_topk", None))
                h = net.blocks[i](h)
                z = net.heads[i](h, p)
                p = z.float().softmax(-1)
                if threshold is not None and float(p[0, -1].max()) >= threshold:
                    break
        used.append(i + 1)
        last = z[0, -1].float()
        if temperature == 0:
            token = last.argmax()[None]
        else:
            token = torch.multinomial((last / temperature).softmax(-1), 1, generator=generator)
        seq = torch.cat([seq, token.to(seq.dtype)])
    return seq, used
