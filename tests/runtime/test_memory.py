"""The tensor-memory probe counts tensors, not the interpreter's lazy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sidpipe.runtime.memory import _MALLINFO2

pytestmark = pytest.mark.skipif(_MALLINFO2 is None, reason="needs glibc mallinfo2")

# A fresh interpreter: the probe's baseline, then the first optimizer and 16 MiB of parameters.
SCRIPT = """
import torch
from sidpipe.runtime.memory import MemoryProbe
probe = MemoryProbe(torch.device("cpu"))
w = torch.nn.Parameter(torch.zeros(4 * 2**20))  # 16 MiB
opt = torch.optim.Adam([w], lr=1e-3)
w.grad = torch.ones_like(w)
opt.step()  # + 16 MiB grad + 32 MiB Adam state
print((probe.current() - probe.baseline) / 2**20)
"""


@pytest.mark.multiprocess
def test_probe_counts_parameters_grads_and_state_only():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    mib = float(r.stdout.strip().splitlines()[-1])
    # 64 MiB of tensors; the first optimizer's lazy torch._dynamo import (~26 MiB of Python
    # heap) must not appear on top of it.
    assert 63 <= mib <= 68, f"probe reads {mib:.1f} MiB for 64 MiB of tensors"
