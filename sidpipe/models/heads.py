"""Belief heads: map a block's features and the previous belief to class logits.

Three kinds for convnet features (C,H,W), chosen by `model.head` (docs/design.md §1):

- `pool` (BeliefHead): global average pool + MLP. Cheapest; the weakest of the auxiliary
  heads the local-learning papers compare: channel means discard *where* a feature fired,
  which matters most for early blocks, whose features are local.
- `spatial` (SpatialBeliefHead): DGL's MLP-SR head (Belilovsky et al., 2020) adapted to SID.
  Keeps a coarse map (about H/4, 2x2..8x8), mixes channels there with 1x1 convs, keeps 2x2
  of spatial layout into the MLP.
- `conv` (ConvBeliefHead): InfoPro's head (Wang et al., 2021): one 3x3 stride-2 conv, then
  global pool and FCs.

Every head reads the previous belief by concatenation after its feature path, so the
belief enters the logits through ordinary linear layers in every kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from sidpipe.config import HEAD_KINDS
from sidpipe.errors import ConfigError


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


def prior_for(x: Tensor, num_classes: int, per_position: bool) -> Tensor:
    """The uniform belief p_0 that goes with input or features x: (B, K), or (B, T, V) for a
    language model, in x's float dtype (token ids: the default float dtype)."""
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return uniform_prior(belief_rows(x, per_position), num_classes, device=x.device, dtype=dtype)


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
    """`model.head=pool`: head_i(h_i, p_{i-1}) -> logits z_i.

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


def index_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds every class index 0..K-1."""
    if num_classes <= 1 << 8:
        return torch.uint8
    if num_classes <= 1 << 16:
        return torch.uint16
    return torch.int32


def topk_belief(p: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """A belief (..., K) as its k largest values (fp32, descending), their class indices (in
    `index_dtype(K)`) and the mass left to the other K-k classes ((..., 1) fp32, 1 minus the
    values' sum, at least 0). torch.topk is deterministic, so the sender of a message and the
    single-process run compute the same triple from the same belief."""
    values, idx = torch.topk(p.float(), k, dim=-1)
    rest = (1.0 - values.sum(-1, keepdim=True)).clamp_min(0.0)
    return values, idx.to(index_dtype(p.shape[-1])), rest


def dense_belief(values: Tensor, idx: Tensor, rest: Tensor, num_classes: int) -> Tensor:
    """The prior a receiving module reads: the k values exactly where they were, the rest
    spread evenly over the other K-k classes. Even is the maximum-entropy choice given only
    the remaining mass: it claims nothing the message does not say (and keeps every class's
    probability above 0, so a head's log-prior stays finite)."""
    k = values.shape[-1]
    fill = rest / (num_classes - k)
    out = fill.expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, idx.long(), values)


def sparse_prior(p: Tensor, k: int | None) -> Tensor:
    """The belief module i+1 reads when module i's belief p passes through top-k compression
    (pipeline.belief_topk=k; None: p itself, dense)."""
    if k is None:
        return p
    return dense_belief(*topk_belief(p, k), p.shape[-1])


def _mlp(n_in: int, hidden: int, num_classes: int) -> nn.Module:
    """Linear(n_in, hidden)-ReLU-Linear(hidden, K), or one Linear when hidden == 0."""
    if hidden == 0:
        return nn.Linear(n_in, num_classes)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    # no conv bias: the BatchNorm right after it has its own shift
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


def _avg_pool(size: tuple[int, int], out: tuple[int, int]) -> nn.Module:
    """Average-pool a (H, W) map to `out`: what nn.AdaptiveAvgPool2d(out) computes, but as
    nothing when the size already fits and as a plain AvgPool2d when it divides evenly, which
    is cheaper on CPU (adaptive pooling's backward is about 2x slower at a head's sizes)."""
    if size == out:
        return nn.Identity()
    if size[0] % out[0] == 0 and size[1] % out[1] == 0:
        kernel = (size[0] // out[0], size[1] // out[1])
        return nn.AvgPool2d(kernel, stride=kernel)
    return nn.AdaptiveAvgPool2d(out)


class _ConvnetHead(nn.Module):
    """A head over a convnet block's (C, H, W) map: `features` (built by the subclass) turn
    it into a vector, and `out` maps cat(features, prior) to K logits."""

    features: nn.Module
    out: nn.Module

    def _set_shape(
        self, kind: str, feature_shape: tuple[int, ...], num_classes: int, where: str
    ) -> tuple[int, int, int]:
        shape = tuple(int(s) for s in feature_shape)
        if len(shape) != 3:
            raise ConfigError(
                f"model.head={kind} needs convnet features (C,H,W), but {where} gives "
                f"{shape}; use model.head=pool"
            )
        self.feature_shape, self.num_classes = shape, num_classes
        return shape  # type: ignore[return-value]

    def forward(self, h: Tensor, prior: Tensor) -> Tensor:
        f = self.features(h)
        return self.out(torch.cat((f, prior.to(f.dtype)), dim=1))

    def extra_repr(self) -> str:
        return f"feature_shape={self.feature_shape}, num_classes={self.num_classes}"


class SpatialBeliefHead(_ConvnetHead):
    """`model.head=spatial`: DGL's MLP-SR head with the previous belief.

    adaptive-avg-pool to (clamp(H/4, 2, 8), clamp(W/4, 2, 8)) (at most H x W) -> `layers` x
    (1x1 conv + BN + ReLU) at max(C, width) channels -> adaptive-avg-pool to 2x2 -> flatten ->
    cat(features, prior) -> MLP(hidden) -> K logits. The 1x1 convs run on the reduced map,
    so their cost does not grow with the block's resolution beyond 8x8; two of them, not
    three, because the head is paid in every SID message
    (benchmarks/results/head-cost-2026-12-03).
    """

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, hidden: int = 256,
                 width: int = 32, layers: int = 2, where: str = "the block") -> None:  # fmt: skip
        super().__init__()
        c, h, w = self._set_shape("spatial", feature_shape, num_classes, where)
        # a map already smaller than 2x2 is kept as it is: pooling "up" would only copy it
        self.reduced = (min(h, 8, max(2, h // 4)), min(w, 8, max(2, w // 4)))
        self.kept = (min(2, self.reduced[0]), min(2, self.reduced[1]))
        ch = max(c, width)
        mods: list[nn.Module] = [_avg_pool((h, w), self.reduced)]
        for i in range(layers):
            mods += _conv_bn_relu(c if i == 0 else ch, ch, kernel=1)
        mods += [_avg_pool(self.reduced, self.kept), nn.Flatten()]
        self.features = nn.Sequential(*mods)
        self.out = _mlp(ch * self.kept[0] * self.kept[1] + num_classes, hidden, num_classes)


class ConvBeliefHead(_ConvnetHead):
    """`model.head=conv`: InfoPro's head with the previous belief.

    3x3 stride-2 conv + BN + ReLU at max(C, width) channels -> global average pool ->
    FC(hidden) + ReLU -> cat(features, prior) -> FC to K logits (hidden == 0: the pooled
    features and the prior go straight into one FC).
    """

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, hidden: int = 256,
                 width: int = 32, where: str = "the block") -> None:  # fmt: skip
        super().__init__()
        c, h, w = self._set_shape("conv", feature_shape, num_classes, where)
        ch = max(c, width)
        mods: list[nn.Module] = [*_conv_bn_relu(c, ch, kernel=3, stride=2)]
        mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if hidden:
            mods += [nn.Linear(ch, hidden), nn.ReLU()]
        self.features = nn.Sequential(*mods)
        self.out = nn.Linear((hidden or ch) + num_classes, num_classes)


def make_head(
    kind: str,
    feature_shape: tuple[int, ...],
    num_classes: int,
    hidden: int = 256,
    width: int = 32,
    where: str = "the block",
) -> nn.Module:
    """The belief head `model.head=kind` for a block with output `feature_shape`; `where`
    names the block in the one-line error when the kind does not fit its features."""
    if kind == "pool":
        return BeliefHead(feature_shape, num_classes, hidden)
    if kind == "spatial":
        return SpatialBeliefHead(feature_shape, num_classes, hidden, width, where=where)
    if kind == "conv":
        return ConvBeliefHead(feature_shape, num_classes, hidden, width, where=where)
    raise ConfigError(f"model.head={kind!r} is unknown; choose one of {', '.join(HEAD_KINDS)}")


def belief_chain(
    blocks: Iterable[nn.Module],
    heads: Iterable[nn.Module],
    h: Tensor,
    p: Tensor,
    topk: int | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """SID inference through consecutive modules: each block refines h, its head turns
    (h, previous belief) into logits, whose softmax is the next belief. Returns the last
    (h, p) and every module's logits. No stop-gradients: training loops add their own.
    topk: each belief passed from one module to the next here is top-k compressed; the
    first module reads p as given and the returned p is the last softmax, uncompressed (a
    pipeline stage compresses it for the wire itself)."""
    logits = []
    for i, (block, head) in enumerate(zip(blocks, heads, strict=True)):
        if i:
            p = sparse_prior(p, topk)
        h = block(h)
        z = head(h, p)
        p = torch.softmax(z, dim=-1)
        logits.append(z)
    return h, p, logits
