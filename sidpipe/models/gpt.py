"""A decoder-only transformer for byte-level language modelling, as SID modules.

Natural layers: one pre-LayerNorm transformer layer each (causal self-attention through
torch's scaled_dot_product_attention, then an MLP); the first also holds the token and
position embeddings, so every later layer maps (B, T, d) features to (B, T, d) features.
`model.blocks=K` groups the layers into K SID modules as for every zoo model.

The belief head (`TokenBeliefHead`) predicts the next byte at every position from that
position's features and the previous module's belief there (docs/design.md §9).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sidpipe.models.vit import TransformerBlock


class TokenEmbedding(nn.Module):
    """Bytes (B, T) int64 -> token + learned position embeddings (B, T, d)."""

    def __init__(self, vocab: int, context: int, dim: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, context, dim))
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        # any length up to the context: generation feeds shorter prefixes
        return self.tok(x) + self.pos[:, : x.shape[1]]


def decoder_layer(dim: int, heads: int) -> TransformerBlock:
    """The ViT's pre-norm block with causal attention and GPT-2-style init: small normal
    weights, zero biases."""
    layer = TransformerBlock(dim, heads, causal=True)
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return layer


def gpt_layers(
    in_shape: tuple[int, ...], vocab: int, width: int = 128, depth: int = 4, heads: int = 4
) -> list[nn.Module]:
    """`depth` decoder layers for windows of in_shape = (context,) tokens of `vocab`."""
    if len(in_shape) != 1:
        raise ValueError(f"model=gpt reads token windows (context,), not inputs of {in_shape}")
    layers: list[nn.Module] = [decoder_layer(width, heads) for _ in range(depth)]
    layers[0] = nn.Sequential(TokenEmbedding(vocab, in_shape[0], width), layers[0])
    return layers


class TokenBeliefHead(nn.Module):
    """head_i(h_i, p_{i-1}) -> next-token logits at every position:

        z_i = U_i LN(h_i) + g_i * log p_{i-1} + c_i

    One unembedding (d x V) per module, as any LM head, plus a per-class gain g_i (V
    numbers, starting at 1) on the previous belief's log: module i starts out refining
    p_{i-1} multiplicatively (a product of experts) instead of relearning it. The cost per
    position is O(dV), linear in the vocabulary; the image heads' cat(features, belief) ->
    Linear would cost O((d+V)V), quadratic, 2.5 G multiply-adds per position at V = 50k
    (docs/design.md §9 measures both).
    """

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.num_classes = vocab
        self.norm = nn.LayerNorm(dim)
        self.unembed = nn.Linear(dim, vocab)
        self.gain = nn.Parameter(torch.ones(vocab))
        nn.init.normal_(self.unembed.weight, std=0.02)
        nn.init.zeros_(self.unembed.bias)

    def forward(self, h: Tensor, prior: Tensor) -> Tensor:
        z = self.unembed(self.norm(h))
        # clamp: a belief may underflow to 0 in fp32; log 0 = -inf would poison the sum
        log_prior = prior.float().clamp_min(1e-30).log()
        return z.float() + self.gain * log_prior

    def extra_repr(self) -> str:
        return f"vocab={self.num_classes}"
