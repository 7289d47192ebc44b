"""CUDA graphs for the SID stage step (`pipeline.cuda_graphs=true`).

A SID stage pays its forward, head, loss, backward and optimizer step on *every* message,
so at small messages the GPU idles between many short kernel launches (the README's GPU
notes: a stage step cost 3.6-4.6 ms against 2.4-3.5 ms of plain forward+backward on an
H200). A CUDA graph replays all of a step's kernels with one launch.

Two graphs, not one, sharing one memory pool: `forward` (blocks, heads, losses) and
`update` (local backward + optimizer step), because the stage sends its output between the
two; that send is what lets the next stage start while this one runs its backward.

- Shapes must be static: a message whose shapes or dtypes differ from the captured one (the
  last partial batch of an epoch) runs eagerly, on the same parameters and optimizer state.
- The first WARMUP messages run eagerly, on the stream that later captures: they create the
  optimizer state and let cuBLAS / cuDNN create their per-stream handles and workspaces
  outside the capture (lazy creation inside a capture fails). They are real training
  steps, not discarded.
- The optimizer must be graph-safe (fused, capturable, lr a device tensor that schedules
  update in place): `stage.build_optimizer(..., lr_device=...)` builds it so.
- Host-side bookkeeping (message counts, lr schedules, metrics) stays outside the graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

WARMUP = 3  # eager messages before capture (PyTorch's whole-network capture example uses 3)

StepOut = tuple[Tensor, Tensor, list[Tensor], list[Tensor]]  # h_out, p_out, losses, logits


class StepGraphs:
    """Capture once, then replay `forward` and `update` for every same-shaped message."""

    def __init__(
        self,
        forward: Callable[[Tensor, Tensor, Tensor], StepOut],
        backward: Callable[[list[Tensor]], None],
        step: Callable[[], None],
        zero_grad: Callable[[], None],
    ):
        self._forward, self._backward, self._step, self._zero_grad = (
            forward, backward, step, zero_grad,
        )  # fmt: skip
        self.fwd_graph: torch.cuda.CUDAGraph | None = None
        self.upd_graph: torch.cuda.CUDAGraph | None = None
        self.static_in: tuple[Tensor, ...] = ()
        self.static_out: StepOut | None = None
        self.eager_left = WARMUP
        self.pending: str | None = None  # how the last forward ran: "graph" | "eager"
        self.replays = 0  # messages run by graph replay
        self.eager = 0  # messages run eagerly (warm-up and shape fallbacks)
        self.stream = torch.cuda.Stream()  # warm-up and both captures (handles are per stream)

    @property
    def captured(self) -> bool:
        return self.fwd_graph is not None

    def _matches(self, inputs: tuple[Tensor, ...]) -> bool:
        return all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            for a, b in zip(inputs, self.static_in, strict=True)
        )

    def _capture(self, inputs: tuple[Tensor, ...]) -> None:
        self.static_in = tuple(t.detach().clone() for t in inputs)
        # .grad None at capture: the captured backward allocates the gradients inside the
        # graph's pool and every replay *writes* them (no accumulation, no zeroing needed).
        self._zero_grad()
        torch.cuda.synchronize()  # nothing of the eager messages may run inside a capture
        self.fwd_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd_graph, stream=self.stream):
            self.static_out = self._forward(*self.static_in)
        self.upd_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.upd_graph, pool=self.fwd_graph.pool(), stream=self.stream):
            self._backward(self.static_out[2])
            self._step()

    def forward(self, h: Tensor, p: Tensor, y: Tensor) -> StepOut:
        inputs = (h, p, y)
        if not self.captured and self.eager_left == 0:
            self._capture(inputs)
        if self.captured and self._matches(inputs):
            assert self.fwd_graph is not None and self.static_out is not None
            for dst, src in zip(self.static_in, inputs, strict=True):
                dst.copy_(src)
            self.fwd_graph.replay()
            self.pending = "graph"
            self.replays += 1
            # Copies: the next replay overwrites the static outputs, possibly while an isend
            # of this message's h and p is still reading them.
            h_out, p_out, losses, logits = self.static_out
            return (
                h_out.clone(), p_out.clone(),
                [x.clone() for x in losses], [z.clone() for z in logits],
            )  # fmt: skip
        self.pending = "eager"
        self.eager += 1
        if self.captured:  # a shape fallback: plain eager on the current stream
            return self._forward(h, p, y)
        with self._warm_up_stream():
            return self._forward(h, p, y)

    @contextlib.contextmanager
    def _warm_up_stream(self) -> Iterator[None]:
        """Run on the capture stream, then wait for it: tensors made there are used and freed
        on the current stream, which the caching allocator cannot see (3 messages only)."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield
        torch.cuda.synchronize()

    def update(self, losses: list[Tensor]) -> None:
        """Backward + optimizer step of the message the last `forward` ran."""
        if self.pending == "graph":
            assert self.upd_graph is not None
            self.upd_graph.replay()
        elif self.pending == "eager":
            # After capture .grad holds the graph's static buffers: an eager backward must
            # not add to them.
            self._zero_grad()
            warm_up = not self.captured
            with self._warm_up_stream() if warm_up else contextlib.nullcontext():
                self._backward(losses)
                self._step()
            self._zero_grad()
            if warm_up:
                self.eager_left -= 1
        else:
            raise RuntimeError("StepGraphs.update called without a forward")
        self.pending = None
