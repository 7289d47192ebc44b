"""Build a configured network: an architecture's natural layers (mlp.py, cnn.py, resnet.py,
vit.py, gpt.py, custom.py) grouped into `cfg.blocks` blocks of a `BlockNet`, or the `shared`
variant's network."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sidpipe.config import LANGUAGE_MODELS, MODEL_NAMES, Config, Variant
from sidpipe.data import DataBundle
from sidpipe.errors import ConfigError
from sidpipe.models.blocknet import BlockNet
from sidpipe.models.cnn import simplecnn_layers, vgg11_layers
from sidpipe.models.custom import custom_layers
from sidpipe.models.gpt import gpt_layers
from sidpipe.models.mlp import mlp_layers
from sidpipe.models.resnet import resnet18_layers
from sidpipe.models.shared import SharedSIDNet
from sidpipe.models.vit import vit_tiny_layers


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
