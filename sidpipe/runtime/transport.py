"""Moving messages between neighbouring stages: send/recv queues over torch.distributed p2p.

A message is a fixed-size int64 header followed by up to three tensors: the activation h,
the belief p and the labels y. The sender keeps a bounded window of outstanding isends
(`pipeline.queue_depth` messages: backpressure with bounded memory); the receiver posts the
irecv of the next header as soon as the current payload is posted, so a message's arrival
overlaps the receiver's compute. Every byte sent is counted here, split by direction: a
send to a lower rank is backward traffic, which SID must never produce. Receiving is timed
in two parts: "recv-wait" (no header yet: the upstream stage has not sent, the stage idles)
and "recv" (header in, the payload moving: gloo transfers a send only once its recv is
posted, so with one core per stage this copy is work that cannot overlap compute).

Headers may travel on their own gloo group in host memory (`header_group`, SID's
`pipeline.host_headers`): over NCCL a header lands in GPU memory, and reading its shape would
wait for everything the stage queued before it (the previous message's backward and step),
so the host could never queue ahead of the GPU. With host headers the only waits are on the
stream. Ops are posted in the same order on both sides, which NCCL requires (it ignores tags).
"""

from __future__ import annotations

import queue
import time
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

import torch
import torch.distributed as dist
from torch import Tensor

from sidpipe.runtime.trace import Span, Tracer

HEADER_LEN = 16
MAX_DIMS = 8
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.float64]


class Kind(IntEnum):
    TRAIN = 1  # h, p, y: forward, send on, update
    EVAL = 2  # h, p, y: forward without update; count hits per depth
    EVAL_END = 3  # h = running per-depth [hits, count] table of the finished split
    EPOCH_END = 4  # no payload
    STOP = 5  # no payload: drain and finish
    CHECKPOINT = 6  # no payload: save this stage's part of step `step`


@dataclass
class Message:
    kind: Kind
    step: int = 0  # training step (index of the batch for TRAIN, steps done for the others)
    epoch: int = 0
    h: Tensor | None = None
    p: Tensor | None = None
    y: Tensor | None = None
    split: int = 0  # EVAL / EVAL_END: which evaluation split

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.h, self.p, self.y) if t is not None]


def _encode(msg: Message) -> Tensor:
    hdr = torch.zeros(HEADER_LEN, dtype=torch.int64)
    hdr[0], hdr[1], hdr[2], hdr[15] = int(msg.kind), msg.step, msg.epoch, msg.split
    if msg.h is not None:
        if msg.h.dim() > MAX_DIMS:
            raise ValueError(f"activation has {msg.h.dim()} dims; the header holds {MAX_DIMS}")
        hdr[3] = msg.h.dim()
        hdr[4] = _DTYPES.index(msg.h.dtype)
        hdr[5 : 5 + msg.h.dim()] = torch.tensor(msg.h.shape)
    hdr[13] = -1 if msg.p is None else msg.p.shape[1]
    hdr[14] = -1 if msg.y is None else msg.y.shape[0]
    return hdr


@dataclass
class TransportStats:
    bytes_forward: int = 0
    bytes_backward: int = 0
    messages_sent: int = 0
    recv_wait_s: float = 0.0  # waiting for a header: nothing sent yet
    recv_s: float = 0.0  # header in, waiting for the payload to arrive
    send_wait_s: float = 0.0


@dataclass
class _Pending:
    works: list
    keep: list[Tensor] = field(default_factory=list)  # tensors must outlive their isend


class Transport:
    """Send to `rank+1`, receive from `rank-1` (either may be absent at the pipeline ends)."""

    def __init__(
        self,
        rank: int,
        world: int,
        device: torch.device,
        queue_depth: int,
        staged: bool,
        reuse_buffers: bool = True,
        tracer: Tracer | None = None,
        header_group: dist.ProcessGroup | None = None,
        group: dist.ProcessGroup | None = None,
        prefetch: bool = True,
    ):
        self.rank, self.world = rank, world
        self.device = device
        # gloo moves CPU tensors only: CUDA compute over gloo stages through pinned host memory.
        self.staged = staged
        self.comm_device = torch.device("cpu") if (staged or device.type == "cpu") else device
        self.group = group  # the payloads' process group (None: the default group)
        # post the next header's irecv as soon as a message is in (off: receive on demand,
        # e.g. from several sources, and never leave a receive posted between phases)
        self.prefetch = prefetch
        self.header_group = header_group or group  # None: headers share the payload's group
        self.header_device = torch.device("cpu") if header_group is not None else self.comm_device
        self.queue_depth = queue_depth
        self.stats = TransportStats()
        self.tracer = tracer
        self._outstanding: deque[_Pending] = deque()
        self._next_header: tuple[Tensor, object] | None = None
        # Receive buffers for h and p, reused message after message: the stage has finished
        # with a message (forward, backward, step) before it receives the next one. Labels
        # are not reused: they travel on in the send window. Not with the staged transport,
        # whose asynchronous host-to-device copy may still be reading the pinned buffer.
        self.reuse_buffers = reuse_buffers and not staged
        self._buffers: dict[tuple, Tensor] = {}

    # ---- sending -------------------------------------------------------------------
    def _stage_out(self, tensors: list[Tensor]) -> list[Tensor]:
        """Staged transport: CUDA tensors go through pinned host memory, one wait per message."""
        if not self.staged or not any(t.device.type == "cuda" for t in tensors):
            return tensors
        out = []
        for t in tensors:
            if t.device.type == "cuda":
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t = host
            out.append(t)
        torch.cuda.current_stream(self.device).synchronize()  # the copies land before gloo reads
        return out

    def _isend(
        self, t: Tensor, dst: int, pending: _Pending, group: dist.ProcessGroup | None = None
    ) -> None:
        t = t.contiguous()
        pending.keep.append(t)
        pending.works.append(dist.isend(t, dst, group=group))
        nbytes = t.numel() * t.element_size()
        if dst > self.rank:
            self.stats.bytes_forward += nbytes
        else:
            self.stats.bytes_backward += nbytes

    def send(self, msg: Message, dst: int | None = None) -> None:
        """Post the message's isends; blocks only while the window of outstanding sends is full."""
        dst = self.rank + 1 if dst is None else dst
        if len(self._outstanding) >= self.queue_depth:
            t0 = time.perf_counter()
            self._wait_oldest()
            self.stats.send_wait_s += time.perf_counter() - t0
        pending = _Pending(works=[])
        self._isend(_encode(msg).to(self.header_device), dst, pending, self.header_group)
        for t in self._stage_out(msg.tensors()):
            self._isend(t, dst, pending, self.group)
        self._outstanding.append(pending)
        self.stats.messages_sent += 1

    def _wait_oldest(self) -> None:
        for w in self._outstanding.popleft().works:
            w.wait()

    def flush(self) -> None:
        t0 = time.perf_counter()
        while self._outstanding:
            self._wait_oldest()
        self.stats.send_wait_s += time.perf_counter() - t0

    # ---- receiving -----------------------------------------------------------------
    def _post_header(self, src: int) -> None:
        buf = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.header_device)
        self._next_header = (buf, dist.irecv(buf, src, group=self.header_group))

    def _buffer(self, shape: list[int], dtype: torch.dtype, role: str = "") -> Tensor:
        key = (role, tuple(shape), dtype)
        if role and self.reuse_buffers and key in self._buffers:
            return self._buffers[key]
        # pinned host buffers let the staged copy to the GPU run asynchronously
        buf = torch.empty(shape, dtype=dtype, device=self.comm_device, pin_memory=self.staged)
        if role and self.reuse_buffers:
            self._buffers[key] = buf
        return buf

    def recv(self, src: int | None = None) -> Message:
        """Wait for the next message; the one after it has its header irecv posted on return."""
        src = self.rank - 1 if src is None else src
        if self._next_header is None:
            self._post_header(src)
        assert self._next_header is not None
        buf, work = self._next_header
        t0 = time.perf_counter()
        work.wait()
        hdr = buf.tolist()  # a GPU header (NCCL, no host_headers) waits for the stream here
        t1 = time.perf_counter()
        kind = Kind(hdr[0])
        h = p = y = None
        works = []
        if hdr[3] > 0:
            shape = hdr[5 : 5 + hdr[3]]
            h = self._buffer(shape, _DTYPES[hdr[4]], "h" if kind is Kind.TRAIN else "")
            works.append(dist.irecv(h, src, group=self.group))
        if hdr[13] >= 0:
            rows = h.shape[0] if h is not None else hdr[14]
            p = self._buffer([rows, hdr[13]], torch.float32, "p" if kind is Kind.TRAIN else "")
            works.append(dist.irecv(p, src, group=self.group))
        if hdr[14] >= 0:
            y = self._buffer([hdr[14]], torch.int64)
            works.append(dist.irecv(y, src, group=self.group))
        if self.prefetch and kind not in (Kind.STOP, Kind.EVAL_END):
            # overlap the next arrival with this message's compute (not after the last
            # message of a phase: nothing may stay posted when the run ends)
            self._post_header(src)
        else:
            self._next_header = None
        for w in works:
            w.wait()
        t2 = time.perf_counter()
        self.stats.recv_wait_s += t1 - t0
        self.stats.recv_s += t2 - t1
        if self.tracer is not None:
            self.tracer.add(Span.RECV_WAIT, t0, t1)
            self.tracer.add(Span.RECV, t1, t2)
        if self.comm_device != self.device:
            h, p, y = (
                None if t is None else t.to(self.device, non_blocking=True) for t in (h, p, y)
            )
        return Message(kind, hdr[1], hdr[2], h, p, y, split=hdr[15])


class LoopbackTransport:
    """The `Transport` interface between stages that are threads of one process.

    For the fast test tier: pipeline runners run in threads and exchange messages through
    queues instead of torch.distributed. Bytes are counted as `Transport` counts them
    (header + tensors, split by direction); a payload is copied on send, so a receiver never
    shares memory with its sender, as across processes. `timeout_s` bounds every wait.
    """

    def __init__(self, rank: int, links: dict[tuple[int, int], queue.Queue], timeout_s: float):
        self.rank, self.links, self.timeout_s = rank, links, timeout_s
        self.comm_device = torch.device("cpu")
        self.stats = TransportStats()

    @staticmethod
    def links(world: int) -> dict[tuple[int, int], queue.Queue]:
        return {(r, r + 1): queue.Queue() for r in range(world - 1)}

    def send(self, msg: Message, dst: int | None = None) -> None:
        dst = self.rank + 1 if dst is None else dst
        h, p, y = (None if t is None else t.detach().clone() for t in (msg.h, msg.p, msg.y))
        copied = Message(msg.kind, msg.step, msg.epoch, h, p, y, split=msg.split)
        nbytes = HEADER_LEN * 8 + sum(t.numel() * t.element_size() for t in copied.tensors())
        if dst > self.rank:
            self.stats.bytes_forward += nbytes
        else:
            self.stats.bytes_backward += nbytes
        self.stats.messages_sent += 1
        self.links[(self.rank, dst)].put(copied)

    def recv(self, src: int | None = None) -> Message:
        src = self.rank - 1 if src is None else src
        t0 = time.perf_counter()
        try:
            msg = self.links[(src, self.rank)].get(timeout=self.timeout_s)
        except queue.Empty:
            raise TimeoutError(f"stage {self.rank}: nothing from stage {src} in "
                               f"{self.timeout_s} s") from None  # fmt: skip
        self.stats.recv_wait_s += time.perf_counter() - t0
        return msg

    def flush(self) -> None:
        pass
