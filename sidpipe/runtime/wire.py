"""How a SID message's belief and labels travel: the codec (runtime/transport.py) carries a
belief as (rows, width) fp32 and labels as a vector, so a language model's (B, T, V)
beliefs travel flattened per sample and its (B, T) targets as (B*T,). bf16 beliefs
(pipeline.belief_dtype) and top-k beliefs (pipeline.belief_topk) travel as their bytes
viewed as fp32 words, so the codec needs no new field and the transport counts the bytes
that really move (docs/design.md §9).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sidpipe.config import Config, Method, Precision
from sidpipe.models.heads import dense_belief, index_dtype, topk_belief
from sidpipe.runtime.transport import Kind, Message


def pack_topk(p: Tensor, k: int) -> Tensor:
    """A belief (..., K) as the bytes of its top-k form (models/heads.py `topk_belief`), per
    row: k fp32 values, the fp32 remaining mass, k indices in the smallest integer dtype
    that holds K, zero-padded to whole fp32 words, and viewed as fp32 (..., W): the codec
    carries it as an ordinary belief of width W and the transport counts what moves."""
    values, idx, rest = topk_belief(p, k)
    parts = [values.view(torch.uint8), rest.view(torch.uint8), idx.view(torch.uint8)]
    pad = -sum(t.shape[-1] for t in parts) % 4
    if pad:
        parts.append(values.new_zeros(*values.shape[:-1], pad, dtype=torch.uint8))
    return torch.cat(parts, -1).view(torch.float32)


def topk_words(k: int, num_classes: int) -> int:
    """W: fp32 words per row of a packed top-k belief."""
    size = torch.empty((), dtype=index_dtype(num_classes)).element_size()
    return -(-(4 * k + 4 + size * k) // 4)


def unpack_topk(words: Tensor, k: int, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Undo `pack_topk`'s byte layout: (values fp32, indices, rest fp32 (..., 1))."""
    raw = words.contiguous().view(torch.uint8)
    dtype = index_dtype(num_classes)
    size = torch.empty((), dtype=dtype).element_size()
    values = raw[..., : 4 * k].contiguous().view(torch.float32)
    rest = raw[..., 4 * k : 4 * k + 4].contiguous().view(torch.float32)
    idx = raw[..., 4 * k + 4 : 4 * k + 4 + size * k].contiguous().view(dtype)
    return values, idx, rest


def to_wire(msg: Message, bf16: bool, topk: int | None = None) -> Message:
    """The codec carries a belief as (rows, width) fp32 and labels as a vector: a language
    model's (B, T, V) beliefs and (B, T) targets travel flattened per sample. bf16 beliefs
    travel as the same bits viewed as fp32 (half the width), so the codec needs no new
    field and the transport counts the bytes that really move; top-k beliefs likewise
    (`pack_topk`, W words per position)."""
    if msg.p is None or msg.y is None:
        return msg
    p = msg.p
    if topk is not None:
        p = pack_topk(p, topk)
    p = p.reshape(p.shape[0], -1)
    if bf16:
        p = p.to(torch.bfloat16).view(torch.float32)
    return Message(msg.kind, msg.step, msg.epoch, msg.h, p, msg.y.reshape(-1), msg.split)


def wire_nbytes(cfg: Config, h: Tensor, p: Tensor, y: Tensor) -> int:
    """Payload bytes of a TRAIN message (h, p, y) as this config sends it (bf16 or top-k
    beliefs): what the simulator and the partition balancer charge a link with."""
    sid = cfg.method is Method.sid  # both settings are SID's (the config refuses top-k for BP)
    topk = cfg.pipeline.belief_topk if sid else None
    bf16 = sid and cfg.pipeline.belief_dtype is Precision.bf16
    wire = to_wire(Message(Kind.TRAIN, h=h, p=p, y=y), bf16, topk)
    return sum(t.numel() * t.element_size() for t in wire.tensors())


def from_wire(
    msg: Message,
    bf16: bool,
    per_position: bool,
    topk: int | None = None,
    num_classes: int = 0,
) -> Message:
    """Undo `to_wire`: beliefs back to dense fp32, per position for a language model; a top-k
    belief is rebuilt into the prior the receiving module reads (`dense_belief`)."""
    if msg.p is None or msg.y is None or msg.h is None:
        return msg
    p, y = msg.p, msg.y
    if bf16:
        p = p.view(torch.bfloat16).float()
    if per_position:
        y = y.reshape(msg.h.shape[0], -1)
    if topk is not None:
        p = p.reshape(*y.shape, topk_words(topk, num_classes))
        p = dense_belief(*unpack_topk(p, topk, num_classes), num_classes)
    elif per_position:
        p = p.reshape(*y.shape, -1)
    return Message(msg.kind, msg.step, msg.epoch, msg.h, p, y, msg.split)
