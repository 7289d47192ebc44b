"""Tensor memory of a stage: what its parameters, optimizer state and activations hold.

On CUDA this is the caching allocator's own count. On CPU torch allocates through malloc,
so glibc's mallinfo2 (bytes in use, heap + mmap) gives the same quantity in well under a
microsecond; the probe samples it after every block's forward and after every update, the
points where a step's memory peaks. The baseline is taken before the model is built, so
data already loaded (stage 0) does not count. Peak RSS is reported beside it, but includes
the Python/torch runtime (~0.7 GiB) and so hides the differences that matter.

mallinfo2 also counts Python's own heap. torch.optim imports torch._dynamo lazily on the
first optimizer built (~890 modules, ~26 MiB); importing it here, before any baseline,
keeps that out of a stage's tensor memory. (Without it a SID stage, whose optimizer is its
first import of dynamo, read ~26 MiB above a BP stage, which imports it with
torch.distributed.pipelining.)
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
import torch._dynamo  # noqa: F401  (see the module docstring)
from torch import nn

from sidpipe.runtime.io import peak_memory_bytes


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def _libc_mallinfo2() -> Any:
    try:
        # the process's own symbols: glibc is already loaded (find_library would run ldconfig
        # in a subprocess at import time)
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc (macOS, musl): no CPU tensor accounting
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _libc_mallinfo2()


class MemoryProbe:
    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = self.current()
        self.peak = self.baseline

    def current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        if _MALLINFO2 is None:
            return 0
        info = _MALLINFO2()
        return int(info.uordblks + info.hblkhd)

    def sample(self, *_: Any) -> None:
        now = self.current()
        if now > self.peak:
            self.peak = now

    def attach(self, blocks: nn.ModuleList) -> None:
        """Sample after every block's forward: activations of a step are all alive by then."""
        for block in blocks:
            block.register_forward_hook(self.sample)

    def report(self) -> dict[str, int]:
        if self.device.type == "cuda":
            self.peak = max(self.peak, int(torch.cuda.max_memory_allocated(self.device)))
        return {
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "peak_tensor_memory_bytes": self.peak - self.baseline,
        }
