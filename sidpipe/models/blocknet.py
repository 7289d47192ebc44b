"""`BlockNet`: a network as a chain of blocks, each with a belief head on its output."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sidpipe.errors import ConfigError
from sidpipe.models.gpt import TokenBeliefHead
from sidpipe.models.heads import belief_chain, make_head, prior_for
from sidpipe.models.partition import even_sizes


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
