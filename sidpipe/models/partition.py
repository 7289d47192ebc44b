"""Cut a BlockNet's blocks into contiguous pipeline stages."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from sidpipe.models.heads import belief_chain, prior_for

if TYPE_CHECKING:  # type only: blocknet.py imports even_sizes from here (no cycle)
    from sidpipe.models.blocknet import BlockNet


def even_sizes(n: int, parts: int) -> list[int]:
    """Split n items into `parts` sizes differing by at most 1; earlier parts take the extra."""
    base, extra = divmod(n, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def partition_blocks(n_blocks: int, stages: int, cuts: Sequence[int] | None = None) -> list[range]:
    """Contiguous ranges of block indices, one per stage.

    Uniform unless `cuts` (pipeline.partition) lists the S-1 block indices where stages 2..S
    start.
    """
    if n_blocks < 1:
        raise ValueError(f"the model must have >= 1 block (got {n_blocks})")
    if stages < 1:
        raise ValueError(f"pipeline.stages must be >= 1 (got {stages})")
    if stages > n_blocks:
        raise ValueError(
            f"pipeline.stages={stages} exceeds the model's {n_blocks} blocks; "
            "lower pipeline.stages or raise model.blocks"
        )
    if cuts is None:
        bounds = [0]
        for size in even_sizes(n_blocks, stages):
            bounds.append(bounds[-1] + size)
    else:
        # plain ints so the message prints [3, 2] for ListConfig / numpy input too
        cut_list = [int(c) if _is_int(c) else c for c in cuts]
        ok = (
            len(cut_list) == stages - 1
            and all(_is_int(c) for c in cut_list)
            and all(1 <= c <= n_blocks - 1 for c in cut_list)
            and all(a < b for a, b in zip(cut_list, cut_list[1:], strict=False))
        )
        if not ok:
            raise ValueError(
                f"pipeline.partition={cut_list} must list {stages - 1} strictly increasing cut "
                f"points in 1..{n_blocks - 1} (pipeline.stages={stages}, {n_blocks} blocks)"
            )
        bounds = [0, *cut_list, n_blocks]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


class Stage(nn.Module):
    """The slice of a BlockNet one pipeline stage hosts: blocks[i] and heads[i] for i in range.

    Holds references (not copies), so the stage and the net share parameters.
    """

    def __init__(self, net: BlockNet, block_range: range) -> None:
        super().__init__()
        if (
            block_range.step != 1
            or len(block_range) == 0
            or block_range.start < 0
            or block_range.stop > net.n_blocks
        ):
            raise ValueError(
                f"block range {block_range} is not a non-empty slice of 0..{net.n_blocks - 1}"
            )
        self.blocks = nn.ModuleList([net.blocks[i] for i in block_range])
        self.heads = nn.ModuleList([net.heads[i] for i in block_range])
        self.first = block_range.start  # global index of this stage's first block
        self.stop = block_range.stop  # one past the global index of its last block
        self.n_total = net.n_blocks
        self.num_classes = net.num_classes
        self.per_position = net.per_position  # a language model: a belief per position
        self.belief_topk = net.belief_topk  # top-k compressed beliefs between modules
        self.in_shape = net.block_shapes()[self.first - 1] if self.first else net.in_shape

    @property
    def is_first(self) -> bool:
        return self.first == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.n_total

    @property
    def block_range(self) -> range:
        return range(self.first, self.stop)

    def forward(self, h: Tensor, p: Tensor | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """SID inference through this stage: (h_{first}, p_{first}) -> (h_out, p_out, logits).

        p=None means the uniform prior (the first stage). No detaching here: training loops
        apply their own stop-gradients.
        """
        if p is None:
            p = self.prior(h)
        return belief_chain(self.blocks, self.heads, h, p, self.belief_topk)

    def bp_forward(self, h: Tensor) -> Tensor:
        """BP semantics: run the blocks; the last stage also applies the final head (uniform
        prior) and so returns logits instead of features."""
        for block in self.blocks:
            h = block(h)
        if self.is_last:
            return self.heads[-1](h, self.prior(h))
        return h

    def prior(self, h: Tensor) -> Tensor:
        """The uniform belief that goes with input or features h."""
        return prior_for(h, self.num_classes, self.per_position)


def _is_int(c: object) -> bool:
    return isinstance(c, numbers.Integral) and not isinstance(c, bool)


def stage_modules(net: BlockNet, stages: int, cuts: Sequence[int] | None = None) -> list[Stage]:
    """One Stage per pipeline stage, covering all of net's blocks in order."""
    return [Stage(net, r) for r in partition_blocks(net.n_blocks, stages, cuts)]
