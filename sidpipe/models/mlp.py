"""MLP natural layers: flatten + Linear/ReLU, then residual Linear/ReLU layers."""

from __future__ import annotations

import math

from torch import Tensor, nn


class ResidualLinear(nn.Module):
    """x + relu(linear(x)): the skip keeps deep MLPs (and short blocks of them) trainable."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.linear(x).relu()


def mlp_layers(in_shape: tuple[int, ...], width: int = 256, depth: int = 4) -> list[nn.Module]:
    """`depth` natural layers; the first flattens any input and maps prod(in_shape) -> width."""
    if depth < 1:
        raise ValueError(f"model.depth must be >= 1 (got {depth})")
    if width < 1:
        raise ValueError(f"model.width must be >= 1 (got {width})")
    first = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), width), nn.ReLU())
    return [first] + [ResidualLinear(width) for _ in range(depth - 1)]
