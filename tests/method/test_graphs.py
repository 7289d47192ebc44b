"""pipeline.cuda_graphs: graphs and eager agree (GPU), the graph-safe optimizer equals the
plain one (CPU), and every setting a graph cannot serve is refused with a clear message."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from sidpipe.config import (
    CONF_DIR,
    Config,
    Device,
    Method,
    OptimConfig,
    PipelineConfig,
    Precision,
    SIDConfig,
    Variant,
    to_config,
)
from sidpipe.errors import ConfigError
from sidpipe.method.graphs import WARMUP
from sidpipe.method.learner import SIDLearner, build_optimizer
from sidpipe.models import build_model
from sidpipe.models.heads import uniform_prior
from sidpipe.models.partition import Stage
from sidpipe.runtime.cadence import RunState
from sidpipe.runtime.io import load_state
from tests.conftest import REPO, TINY, read_summary, run_cli

GRAPHS = PipelineConfig(cuda_graphs=True)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: Config(method=Method.bp, pipeline=GRAPHS), "does not apply to method=bp"),
        (
            lambda: Config(sid=SIDConfig(variant=Variant.shared), pipeline=GRAPHS),
            "does not apply to method=sid sid.variant=shared",
        ),
        (
            lambda: Config(sid=SIDConfig(accumulate_steps=2), pipeline=GRAPHS),
            "needs sid.accumulate_steps=1",
        ),
        (lambda: Config(optim=OptimConfig(fused=False), pipeline=GRAPHS), "optim.fused=true"),
        (lambda: Config(device=Device.cpu, pipeline=GRAPHS), "cannot be used with device=cpu"),
    ],
)
def test_settings_a_graph_cannot_serve_are_refused(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_gpu_check_script_overrides_compose():
    """benchmarks/gpu_check.sh runs on a lent GPU machine only: every bench command in it must
    at least form a valid config here (the device checks are left to that machine)."""
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    cpu16 = shlex.split(script.split("CPU16=(")[1].split(")")[0])
    configs = []
    for line in script.splitlines():
        if "sidpipe.cli bench" not in line:
            continue
        args = shlex.split(line.split("sidpipe.cli bench", 1)[1].split("2>&1")[0])
        overrides = []
        for a in args:
            if a == "${CPU16[@]}":
                overrides += cpu16
            elif not a.startswith(("bench.out_dir", "hydra.")):
                overrides.append(a.replace("$graphs", "true").replace("$cuts", "auto"))
        overrides = [("bench." + a) if a.startswith("schemes=") else a for a in overrides]
        with initialize_config_dir(CONF_DIR, version_base=None):
            configs.append(to_config(compose("config", overrides)))
    gpu, cpu_mlp, cpu_r18, sim_measured, sim_r18 = configs
    assert gpu.pipeline.cuda_graphs and gpu.bench.mode == "simulate"
    assert gpu.bench.batch_size // gpu.bench.microbatches[0] == 64  # the target's microbatch
    for c in (cpu_mlp, cpu_r18):
        assert c.pipeline.threads * c.bench.stages[0] == 16 and c.pipeline.cpu_affinity
    assert cpu_mlp.model.depth == 16 and cpu_r18.pipeline.partition == "auto"
    # PARTS=sim: measured at S=2 with stages free to leave gloo a core; ResNet-18 on the GPU
    assert sim_measured.bench.mode == "throughput" and sim_measured.bench.stages == [2]
    assert sim_measured.pipeline.threads == 1 and not sim_measured.pipeline.cpu_affinity
    assert sim_r18.bench.mode == "simulate" and sim_r18.device == "cuda"
    assert sim_r18.pipeline.partition == "auto" and sim_r18.bench.stages == [4, 8]


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("stages", [1, 2])
def test_cli_without_gpu_names_the_problem(stages, tmp_path):
    r = run_cli(
        [*TINY, f"pipeline.stages={stages}", "pipeline.cuda_graphs=true"], tmp_path, timeout=60
    )
    assert r.returncode != 0
    assert "pipeline.cuda_graphs=true needs a CUDA device; this" in r.stderr
    assert "Traceback" not in r.stderr and "[stage" not in r.stderr  # before any stage starts


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_graph_safe_optimizer_follows_the_plain_one(name):
    """lr as a tensor (what a captured step reads) with a cosine schedule: same trajectory."""
    cfg = OptimConfig(name=name, lr=0.05, weight_decay=0.01, schedule="cosine")
    torch.manual_seed(0)
    nets = [nn.Linear(6, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    init = [q.detach().clone() for q in nets[0].parameters()]
    plain, plain_sched = build_optimizer(nets[0].parameters(), cfg, total_steps=6)
    safe, safe_sched = build_optimizer(nets[1].parameters(), cfg, 6, lr_device=torch.device("cpu"))
    lr = safe.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    x = torch.randn(8, 6)
    for _ in range(6):
        for net, opt, sched in ((nets[0], plain, plain_sched), (nets[1], safe, safe_sched)):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
    # the schedule wrote the same tensor in place: a captured step would see every value
    assert safe.param_groups[0]["lr"] is lr
    assert float(lr) == pytest.approx(plain.param_groups[0]["lr"], rel=1e-6)
    for a, b, a0 in zip(nets[0].parameters(), nets[1].parameters(), init, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a, a0)  # and they did train


def test_graph_safe_schedule_survives_a_checkpoint():
    """Scheduler state of a tensor-lr optimizer goes into the checkpoint's JSON and back."""
    cfg = OptimConfig(lr=0.1, schedule="cosine")
    net = nn.Linear(3, 2)
    opt, sched = build_optimizer(net.parameters(), cfg, 10, lr_device=torch.device("cpu"))
    for _ in range(4):
        opt.step()
        sched.step()
    saved = json.loads(json.dumps(RunState().to_json([sched])))
    opt2, sched2 = build_optimizer(net.parameters(), cfg, 10, lr_device=torch.device("cpu"))
    lr = opt2.param_groups[0]["lr"]
    RunState.from_json(saved, [sched2])
    for _ in range(2):
        sched.step()
        sched2.step()
    assert opt2.param_groups[0]["lr"] is lr  # still the tensor a captured step reads
    assert float(lr) == pytest.approx(float(opt.param_groups[0]["lr"]), rel=1e-6)


# ---- GPU --------------------------------------------------------------------------------


def _stage(cfg: Config) -> SIDLearner:
    torch.manual_seed(0)
    net = build_model(cfg.model, (1, 8, 8), 10)
    return SIDLearner(Stage(net, range(net.n_blocks)), cfg, 50, torch.device("cuda"))


@cuda
@pytest.mark.parametrize("precision", [Precision.fp32, Precision.bf16])
def test_graphs_and_eager_agree(precision):
    """Same messages through a graphed and an eager stage: same losses, same parameters.
    The last message is a partial batch: it must fall back to eager on the same state."""
    base = dict(precision=precision, optim=OptimConfig(schedule="cosine"))
    eager = _stage(Config(**base, pipeline=PipelineConfig(cuda_graphs=False)))
    graphed = _stage(Config(**base, pipeline=GRAPHS))
    g = torch.Generator().manual_seed(1)
    sizes = [32] * 12 + [20]
    tol = dict(rtol=1e-4, atol=1e-5) if precision is Precision.fp32 else dict(rtol=2e-2, atol=2e-3)
    for n in sizes:
        x = torch.randn(n, 1, 8, 8, generator=g).cuda()
        y = torch.randint(0, 10, (n,), generator=g).cuda()
        p = uniform_prior(n, 10, "cuda")
        outs = []
        for st in (eager, graphed):
            h, p_out, losses, _ = st.forward(x, p, y)
            st.update(losses)
            outs.append((h, p_out, torch.stack(losses)))
        for a, b in zip(*outs, strict=True):
            assert torch.allclose(a.float(), b.float(), **tol)
    assert graphed.graphs.replays == len(sizes) - WARMUP - 1
    assert graphed.graphs.eager == WARMUP + 1
    for a, b in zip(eager.stage.parameters(), graphed.stage.parameters(), strict=True):
        assert torch.allclose(a, b, **tol)


@pytest.mark.multiprocess
@cuda
def test_pipeline_with_graphs_equals_sequential(tmp_path):
    """S=2 on one GPU (both ranks share it; staged transport) against the sequential trainer."""
    common = [*TINY, "device=cuda", "pipeline.cuda_graphs=true", "train.max_steps=25"]
    seq, pipe = tmp_path / "seq", tmp_path / "pipe"
    assert run_cli([*common, "pipeline.stages=1"], seq).returncode == 0
    r = run_cli([*common, "pipeline.stages=2", "pipeline.transport=staged"], pipe)
    assert r.returncode == 0, r.stderr
    want, got = load_state(seq), load_state(pipe)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-5, atol=1e-6), key
    assert read_summary(pipe)["test_accuracy"] > 0.5
