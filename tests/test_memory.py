"""The tensor-memory probe counts tensors, not the interpreter's lazy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sidpipe.memory import _MALLINFO2

pytestmark = pytest.mark.skipif(_MALLINFO2 is None, reason="needs glibc mallinfo2")

# A fresh interpreter: the probe's baseline, then the first optimizer and 16 MiB of parameters.
SCRIPT = """
import torch
from sidpipe.memory import MemoryProbe
probe = MemoryProbe(torch.device("cpu"))
w = torch.nn.Parameter(torch.zeros(4 * 2**20))  # 16 MiB
opt = torch.optim.Adam([w], lr=1e-3)
w.grad = torch.ones_like(w)
opt.step()  # + 16 MiB grad + 32 MiB Adam state
print((probe.current() - probe.baseline) / 2**20)
"""


def test_probe_counts_parameters_grads_and_state_only():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    mib = float(r.stdout.strip().splitlines()[-1])
    # 64 MiB of tensors; the first optimizer's lazy torch._dynamo import (~26 MiB of Python
    # heap) must not appear on top of it.
    assert 63 <= mib <= 68, f"probe reads {mib:.1f} MiB for 64 MiB of tensors"


# A fresh interpreter set up as a stage process is, then SID messages through the last four
# blocks of bench_mlp (width 1024: 4.2M parameters); prints page faults per message.
FAULTS = """
import resource, sys
import torch
from sidpipe.config import Config, ModelConfig, PipelineConfig
from sidpipe.models import build_model
from sidpipe.models.partition import StageModule
from sidpipe.pipeline.dist import set_threads
from sidpipe.stage import SIDStage
cfg = Config(model=ModelConfig(name="mlp", width=1024, depth=8, head_hidden=0),
             pipeline=PipelineConfig(retain_heap=sys.argv[1] == "true"))
set_threads(cfg, 0)
net = build_model(cfg.model, (1, 28, 28), 10)
stage = SIDStage(StageModule(net, range(4, 8)), cfg, 100, torch.device("cpu"))
h, p, y = torch.randn(64, 1024), torch.full((64, 10), 0.1), torch.randint(0, 10, (64,))
def message():
    _, _, losses, _ = stage.forward(h, p, y)
    stage.update(losses)
for _ in range(3):
    message()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    message()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.parametrize("retain", [True, False])
def test_retain_heap_stops_refaulting_every_message(retain):
    r = subprocess.run(
        [sys.executable, "-c", FAULTS, str(retain).lower()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    faults = float(r.stdout.strip().splitlines()[-1])
    grad_pages = 4 * 2**20 * 4 / 4096  # one message's gradients, in 4 KiB pages
    if retain:  # freed blocks come back from the heap: no page is touched anew
        assert faults < 0.01 * grad_pages, f"{faults:.0f} page faults per message"
    else:  # glibc's default returns them to the kernel, so every message faults them back
        assert faults > 0.5 * grad_pages, f"only {faults:.0f} page faults per message"
