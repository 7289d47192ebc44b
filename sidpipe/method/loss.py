"""The SID local loss (docs/design.md §1).

    L_i = alpha * KL(target || p_i) + (1 - alpha) * KL(sg(p_{i-1}) || p_i)      (forward)
    L_i = alpha * KL(p_i || target) + (1 - alpha) * KL(p_i || sg(p_{i-1}))      (reverse)

With forward KL and a one-hot target the first term *is* the cross-entropy (a one-hot has
zero entropy), which is what the reference code computes. Reverse KL puts p_i first; it
needs a target with full support, so the label term uses a smoothed one-hot and both
targets are clamped away from zero to keep the loss finite.

Top-k beliefs (pipeline.belief_topk=k): the previous belief arrived as its k largest values
and the mass of the rest. sid.topk_consistency=partition computes the consistency term as
the KL between the two beliefs *on the partition the message describes* — each of the k
classes on its own, the other V - k as one outcome — so it asks p_i to agree with what was
sent and nothing more. Against the rebuilt prior (the rest spread evenly; `even`, the
default) the KL is this term plus rest * KL(uniform || p_i's tail): a push toward a flat
tail the sender never claimed (the chain rule of KL: docs/language-models.md,
tests/method/test_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Smallest probability a reverse-KL target may hold: log(EPS) bounds the loss.
EPS = 1e-8


def smoothed_onehot(y: Tensor, num_classes: int, label_smoothing: float) -> Tensor:
    """(1 - s) * onehot(y) + s / K, the label distribution of torch's cross-entropy."""
    onehot = F.one_hot(y, num_classes).float()
    return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes


def at_least_fp32(t: Tensor) -> Tensor:
    """Upcast half types (bf16 autocast outputs); leave fp32 and fp64 alone."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def partition_kl(log_p: Tensor, prev: Tensor, k: int, direction: str) -> Tensor:
    """Mean KL between the rows of `prev` and exp(log_p) on the partition {each of prev's k
    largest classes, the other classes as one}: forward KL(prev || p), reverse KL(p || prev).
    `prev` is a rebuilt top-k prior (models/heads.py `dense_belief`): its k largest values
    are the ones sent (the even fill is never above them), so torch.topk finds them again."""
    sent, idx = torch.topk(prev, k, dim=-1)
    rest = (1.0 - sent.sum(-1)).clamp_min(0.0)  # as the sender computed it (topk_belief)
    log_known = log_p.gather(-1, idx)
    log_rest = log_p.scatter(-1, idx, float("-inf")).logsumexp(-1)  # log of p's tail mass
    if direction == "forward":
        return (
            (torch.xlogy(sent, sent) - sent * log_known).sum(-1)
            + torch.xlogy(rest, rest)
            - rest * log_rest
        ).mean()
    known, tail = log_known.exp(), log_rest.exp()
    return (
        (known * (log_known - sent.clamp_min(EPS).log())).sum(-1)
        + tail * (log_rest - rest.clamp_min(EPS).log())
    ).mean()


def sid_loss(
    logits: Tensor,
    y: Tensor,
    prev_belief: Tensor,
    alpha: float = 0.5,
    kl_direction: str = "forward",
    label_smoothing: float = 0.0,
    sent_k: int | None = None,
) -> Tensor:
    """Local SID loss of one module; `prev_belief` is detached here (stop-gradient).

    Logits of shape (B, T, V) (a language model: a belief per position) are scored as B*T
    rows: the loss is the mean over every position. sent_k=k: `prev_belief` is a rebuilt
    top-k prior and the consistency term is `partition_kl` over what was sent."""
    if logits.dim() > 2:
        logits, y, prev_belief = logits.flatten(0, -2), y.flatten(), prev_belief.flatten(0, -2)
    # Beliefs and losses in fp32 at least, also under bf16 autocast (float64 stays float64).
    logits = at_least_fp32(logits)
    prev = at_least_fp32(prev_belief.detach())
    log_p = F.log_softmax(logits, dim=-1)
    direction = getattr(kl_direction, "value", kl_direction)
    if direction not in ("forward", "reverse"):
        raise ValueError(f"sid.kl_direction={kl_direction!r} must be forward or reverse")
    if direction == "forward":
        fidelity = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    else:
        target = smoothed_onehot(y, logits.shape[-1], label_smoothing)
        fidelity = (log_p.exp() * (log_p - target.clamp_min(EPS).log())).sum(-1).mean()
    if sent_k is not None:
        consistency = partition_kl(log_p, prev, sent_k, direction)
    elif direction == "forward":
        # kl_div(input=log p_i, target=p_{i-1}) = sum p_{i-1} (log p_{i-1} - log p_i); torch
        # treats 0 * log 0 as 0, so a prior with exact zeros stays finite.
        consistency = F.kl_div(log_p, prev, reduction="batchmean")
    else:
        consistency = (log_p.exp() * (log_p - prev.clamp_min(EPS).log())).sum(-1).mean()
    return alpha * fidelity + (1.0 - alpha) * consistency
