"""Model zoo: networks as chains of blocks with one belief head per block.

Each architecture supplies its natural layers (mlp.py, cnn.py, resnet.py, vit.py);
`build_model` groups them into `cfg.blocks` blocks and attaches a belief head to each
(`model.head`: models/heads.py).
Nothing here imports runtime code (no torch.distributed, no trainers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sidpipe.config import LANGUAGE_MODELS, MODEL_NAMES, Config, Variant
from sidpipe.data import DataBundle
from sidpipe.errors import ConfigError
from sidpipe.models.cnn import simplecnn_layers, vgg11_layers
from sidpipe.models.custom import custom_layers
from sidpipe.models.gpt import TokenBeliefHead, gpt_layers
from sidpipe.models.heads import (
    BeliefHead,
    belief_chain,
    make_head,
    prior_for,
    uniform_prior,
)
from sidpipe.models.mlp import mlp_layers
from sidpipe.models.partition import Stage, even_sizes, partition_blocks, stage_modules
from sidpipe.models.resnet import resnet18_layers
from sidpipe.models.shared import SharedSIDNet
from sidpipe.models.vit import vit_tiny_layers

__all__ = [
    "MODEL_NAMES",
    "BeliefHead",
    "BlockNet",
    "SharedSIDNet",
    "Stage",
    "build_model",
    "natural_layers",
    "partition_blocks",
    "stage_modules",
    "uniform_prior",
]


class BlockNet(nn.Module):
    """A chain of blocks b_1..b_L, each with a belief head on its output.

    `layers` (the model's natural layers) are grouped into `n_blocks` consecutive
    nn.Sequential blocks, as evenly as possible (earlier blocks take the extra layer).
    per_position: a language model; inputs are token windows (B, T), features (B, T, d),
    and every position has its own belief (TokenBeliefHead).
    head, head_width: the belief head kind and its conv width (models/heads.py `make_head`);
    the head is part of its block's module, so it trains, partitions and costs with it.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        in_shape: tuple[int, ...],
        num_classes: int,
        n_blocks: int | None = None,
        head_hidden: int = 256,
        name: str = "model",
        per_position: bool = False,
        head: str = "pool",
        head_width: int = 32,
    ) -> None:
        super().__init__()
        self.per_position = per_position
        # pipeline.belief_topk: beliefs pass between modules top-k compressed (set by
        # build_net for SID; inference must read the priors the modules were trained on)
        self.belief_topk: int | None = None
        natural = len(layers)
        n = natural if n_blocks is None else n_blocks
        if not 1 <= n <= natural:
            raise ValueError(
                f"model.blocks={n_blocks} is out of range: {name} has {natural} natural layers, "
                f"so model.blocks must be in 1..{natural}"
            )
        self.name = name
        self.in_shape = tuple(int(s) for s in in_shape)
        self.num_classes = int(num_classes)
        self.natural_layers = natural
        self.blocks = nn.ModuleList()
        start = 0
        for size in even_sizes(natural, n):
            self.blocks.append(nn.Sequential(*layers[start : start + size]))
            start += size
        self._block_shapes = self._probe_shapes()
        self.heads = nn.ModuleList(
            TokenBeliefHead(s[-1], self.num_classes)
            if per_position
            else make_head(
                head,
                s,
                self.num_classes,
                head_hidden,
                head_width,
                where=f"model={name} block {i + 1} of {n}",
            )
            for i, s in enumerate(self._block_shapes)
        )

    @torch.no_grad()
    def _probe_shapes(self) -> list[tuple[int, ...]]:
        # eval mode so the probe neither updates BatchNorm statistics nor needs batch > 1
        modes = [m.training for m in self.modules()]
        self.eval()
        try:
            dtype = torch.long if self.per_position else torch.get_default_dtype()
            h = torch.zeros(2, *self.in_shape, dtype=dtype)
            shapes = []
            for i, block in enumerate(self.blocks):
                try:
                    h = block(h)
                except Exception as e:  # noqa: BLE001 - a custom model's layers do not chain
                    raise ConfigError(
                        f"model={self.name}: block {i + 1} of {len(self.blocks)} fails on an "
                        f"input of shape {tuple(h.shape[1:])} (the previous layer's output): "
                        f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                    ) from None
                shapes.append(tuple(h.shape[1:]))
        finally:
            for m, mode in zip(self.modules(), modes, strict=True):
                m.training = mode
        return shapes

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def block_shapes(self) -> list[tuple[int, ...]]:
        """Output shape (without batch dim) of each block for self.in_shape."""
        return list(self._block_shapes)

    def prior(self, x: Tensor) -> Tensor:
        """The uniform belief p_0 for input x ((B, K), or (B, T, V) for a language model)."""
        return prior_for(x, self.num_classes, self.per_position)

    def forward(self, x: Tensor) -> list[Tensor]:
        """SID inference: logits at every depth (the last one is the prediction)."""
        return belief_chain(self.blocks, self.heads, x, self.prior(x), self.belief_topk)[2]

    def bp_forward(self, x: Tensor) -> Tensor:
        """BP baseline: all blocks, then the final head fed the uniform prior."""
        h = x
        for block in self.blocks:
            h = block(h)
        return self.heads[-1](h, self.prior(x))


def _width(cfg: Any, standard: int) -> int:
    """model.width, or the architecture's standard width when it is not set."""
    width = getattr(cfg, "width", None)
    return standard if width is None else int(width)


_BUILDERS: dict[str, Callable[[Any, tuple[int, ...], int], list[nn.Module]]] = {
    "mlp": lambda cfg, s, k: mlp_layers(s, width=_width(cfg, 256), depth=int(cfg.depth)),
    "simplecnn": lambda cfg, s, k: simplecnn_layers(s, width=_width(cfg, 32)),
    "vgg11": lambda cfg, s, k: vgg11_layers(s, width=_width(cfg, 64)),
    "resnet18": lambda cfg, s, k: resnet18_layers(s, width=_width(cfg, 64)),
    "vit_tiny": lambda cfg, s, k: vit_tiny_layers(s, dim=_width(cfg, 192)),
    "custom": lambda cfg, s, k: custom_layers(cfg.target, s, k, dict(cfg.kwargs or {})),
    "gpt": lambda cfg, s, k: gpt_layers(
        s, k, width=_width(cfg, 128), depth=int(cfg.depth), heads=int(getattr(cfg, "heads", 4))
    ),
}
assert tuple(_BUILDERS) == MODEL_NAMES


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ConfigError(f"model.name={name!r} is unknown; choose one of {', '.join(MODEL_NAMES)}")


def natural_layers(cfg: Any, in_shape: tuple[int, ...], num_classes: int = 10) -> list[nn.Module]:
    """The model's natural layers (before grouping into blocks)."""
    _check_name(cfg.name)
    return _BUILDERS[cfg.name](cfg, tuple(int(s) for s in in_shape), num_classes)


def build_model(cfg: Any, in_shape: tuple[int, ...], num_classes: int) -> BlockNet:
    """Build cfg.name for inputs of `in_shape` and `num_classes` classes.

    cfg needs `name`, `blocks`, `width`, `depth`, `head_hidden` (width: None = the
    architecture's standard, see ModelConfig; depth only shapes the mlp); `head` and
    `head_width` default to the pool head when cfg lacks them.
    """
    layers = natural_layers(cfg, in_shape, num_classes)
    if cfg.blocks is not None and not 1 <= cfg.blocks <= len(layers):
        raise ConfigError(
            f"model.blocks={cfg.blocks} is out of range: model={cfg.name} has {len(layers)} "
            f"natural layers here, so model.blocks must be in 1..{len(layers)}"
        )
    return BlockNet(
        layers,
        in_shape,
        num_classes,
        n_blocks=cfg.blocks,
        head_hidden=int(cfg.head_hidden),
        name=cfg.name,
        per_position=cfg.name in LANGUAGE_MODELS,
        head=str(getattr(cfg, "head", "pool")),
        head_width=int(getattr(cfg, "head_width", 32)),
    )


def build_net(cfg: Config, data: DataBundle) -> nn.Module:
    """The same seed gives the same initial parameters on every rank and in the reference."""
    torch.manual_seed(cfg.seed)
    if cfg.sid.variant is Variant.shared:
        return SharedSIDNet(data.in_shape, data.num_classes, n_modules=cfg.sid.modules)
    net = build_model(cfg.model, data.in_shape, data.num_classes)
    k = cfg.pipeline.belief_topk
    if k is not None:
        if not 1 <= k < net.num_classes:
            raise ConfigError(f"pipeline.belief_topk={k} must be in 1..{net.num_classes - 1} "
                              f"(this data has {net.num_classes} classes)")  # fmt: skip
        net.belief_topk = k
    return net
