"""Belief heads: map a block's features and the previous belief to class logits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


def uniform_prior(
    batch: int | Sequence[int],
    num_classes: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The SID starting belief p_0: every class equally likely, shape (batch, num_classes);
    batch may be several leading dims ((B, T) for a language model: one belief per position)."""
    lead = (batch,) if isinstance(batch, int) else tuple(int(b) for b in batch)
    return torch.full((*lead, num_classes), 1.0 / num_classes, device=device, dtype=dtype)


def belief_rows(h: Tensor, per_position: bool) -> tuple[int, ...]:
    """The leading dims of the beliefs that go with input or features h: (B,) for a
    classifier, (B, T) for a language model (tokens (B, T) or features (B, T, d))."""
    return tuple(h.shape[:2]) if per_position else (h.shape[0],)


class _GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C)."""

    def forward(self, h: Tensor) -> Tensor:
        return h.mean(dim=(2, 3))


class _TokenPool(nn.Module):
    """(B, N, D) -> (B, D): LayerNorm (the ViT's final norm) then mean over tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(h).mean(dim=1)


class BeliefHead(nn.Module):
    """head_i(h_i, p_{i-1}) -> logits z_i.

    The features are pooled to a vector F (conv maps: global average pool; token sequences:
    LayerNorm + mean; vectors: as is), concatenated with the prior belief as cat(features,
    prior) and fed to Linear(F+K, hidden)-ReLU-Linear(hidden, K), or a single Linear when
    hidden == 0.
    """

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, hidden: int = 256):
        super().__init__()
        feature_shape = tuple(int(s) for s in feature_shape)
        if num_classes < 1:
            raise ValueError(f"BeliefHead needs num_classes >= 1 (got {num_classes})")
        if hidden < 0:
            raise ValueError(f"model.head_hidden must be >= 0 (got {hidden})")
        self.feature_shape = feature_shape
        self.num_classes = num_classes
        if len(feature_shape) == 3:
            self.pool: nn.Module = _GlobalAvgPool()
            feat = feature_shape[0]
        elif len(feature_shape) == 2:
            self.pool = _TokenPool(feature_shape[1])
            feat = feature_shape[1]
        elif len(feature_shape) == 1:
            self.pool = nn.Identity()
            feat = feature_shape[0]
        else:
            raise ValueError(
                f"BeliefHead supports features of shape (C,H,W), (N,D) or (D,); got {feature_shape}"
            )
        self.in_features = feat
        if hidden == 0:
            self.mlp: nn.Module = nn.Linear(feat + num_classes, num_classes)
        else:
            self.mlp = nn.Sequential(
                nn.Linear(feat + num_classes, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            )

    def forward(self, h: Tensor, prior: Tensor) -> Tensor:
        f = self.pool(h)
        # the prior is a probability vector; the caller decides whether it carries gradient
        return self.mlp(torch.cat((f, prior.to(f.dtype)), dim=1))

    def extra_repr(self) -> str:
        return f"feature_shape={self.feature_shape}, num_classes={self.num_classes}"


def belief_chain(
    blocks: Iterable[nn.Module], heads: Iterable[nn.Module], h: Tensor, p: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """SID inference through consecutive modules: each block refines h, its head turns
    (h, previous belief) into logits, whose softmax is the next belief. Returns the last
    (h, p) and every module's logits. No stop-gradients: training loops add their own."""
    logits = []
    for block, head in zip(blocks, heads, strict=True):
        h = block(h)
        z = head(h, p)
        p = torch.softmax(z, dim=-1)
        logits.append(z)
    return h, p, logits
