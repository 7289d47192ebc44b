"""pipeline.partition=auto: the DP finds the optimal cuts; auto runs equal manual runs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sidpipe.config import Config, ModelConfig
from sidpipe.drivers.balance import BlockCost, best_cuts, message_step
from sidpipe.method.learner import SIDLearner
from sidpipe.models import build_model
from sidpipe.models.partition import Stage
from sidpipe.runtime.io import load_state
from tests.conftest import TINY, read_summary, run_cli


def _brute(costs, stages, bw):
    n, best = len(costs), None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        b = [0, *cuts, n]
        t = max(sum(c.seconds for c in costs[x:y]) + (costs[y - 1].out_bytes / bw if y < n else 0)
                for x, y in zip(b, b[1:]))  # fmt: skip
        if best is None or t < best[0] - 1e-12:
            best = (t, list(cuts))
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_best_cuts_is_optimal(seed, stages):
    g = torch.Generator().manual_seed(seed)
    seconds = torch.rand(8, generator=g) * 10
    nbytes = torch.randint(0, 10**6, (8,), generator=g)
    costs = [BlockCost(float(t), int(b)) for t, b in zip(seconds, nbytes)]
    cuts, predicted = best_cuts(costs, stages, bandwidth=1e6)
    want, _ = _brute(costs, stages, 1e6)
    assert max(predicted) == pytest.approx(want)
    assert len(cuts) == stages - 1 and cuts == sorted(set(cuts))


def test_unbalanced_costs_move_the_cut():
    costs = [BlockCost(1.0, 0), BlockCost(1.0, 0), BlockCost(1.0, 0), BlockCost(5.0, 0)]
    assert best_cuts(costs, 2, 1.0)[0] == [3]  # uniform would be [2]: 2 vs 6 -> 3 vs 5


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_measured_block_step_carries_the_head():
    # partition=auto (and the simulator) time one message through a block's whole module:
    # a heavier head must show up in what is measured. The step's FLOPs grow, from pool to
    # conv, by exactly the difference of the two heads' own forward + backward FLOPs.
    torch.set_num_threads(1)
    steps, heads = {}, {}
    for kind in ("pool", "conv"):
        cfg = Config(model=ModelConfig(name="simplecnn", width=4, blocks=2, head=kind,
                                       head_width=8, head_hidden=8))  # fmt: skip
        torch.manual_seed(0)
        net = build_model(cfg.model, (1, 8, 8), num_classes=10)
        x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
        stage = SIDLearner(Stage(net, range(0, 1)), cfg, 10, torch.device("cpu"))
        step, out = message_step(stage, x, net.prior(x), y)
        steps[kind] = _flops(step)
        h, head, p = out["fwd"][0].detach().requires_grad_(), net.heads[0], net.prior(x)
        heads[kind] = _flops(lambda h=h, head=head, p=p: head(h, p).sum().backward())
    assert steps["conv"] > steps["pool"]
    assert steps["conv"] - steps["pool"] == heads["conv"] - heads["pool"]


@pytest.mark.multiprocess
def test_auto_partition_run_equals_manual_run_with_same_cuts(tmp_path):
    auto, manual = tmp_path / "auto", tmp_path / "manual"
    args = [*TINY, "model.depth=6", "pipeline.stages=3", "train.max_steps=12", "train.epochs=1"]
    r = run_cli([*args, "pipeline.partition=auto"], auto)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pipeline.partition=auto -> [" in r.stdout
    cuts = read_summary(auto)["config"]["pipeline"]["partition"]
    assert isinstance(cuts, list) and len(cuts) == 2
    # the plan: what was measured per block, predicted per stage, and measured per stage
    plan = read_summary(auto)["partition_auto"]
    assert plan["cuts"] == cuts and len(plan["block_step_ms"]) == 6
    assert len(plan["predicted_stage_ms"]) == len(plan["measured_stage_ms"]) == 3
    assert all(t > 0 for t in plan["predicted_stage_ms"] + plan["measured_stage_ms"])
    assert "per-message stage step [ms] predicted / measured:" in r.stdout
    r = run_cli([*args, f"pipeline.partition=[{cuts[0]},{cuts[1]}]"], manual)
    assert r.returncode == 0, r.stderr[-2000:]
    a, m = load_state(auto), load_state(manual)
    assert all(torch.equal(a[k], m[k]) for k in a)
    assert read_summary(auto)["per_depth_accuracy"] == read_summary(manual)["per_depth_accuracy"]


@pytest.mark.multiprocess
def test_bad_partition_value(tmp_path):
    r = run_cli([*TINY, "pipeline.stages=2", "pipeline.partition=balanced"], tmp_path, timeout=60)
    assert r.returncode != 0 and "must be a list of cut points or auto" in r.stderr


@pytest.mark.parametrize("model", ["mlp", "simplecnn", "vgg11", "resnet18", "vit_tiny"])
def test_auto_partition_profiles_every_model(model):
    """Each model's blocks are timed on this device and cut into 3 non-empty stages."""
    from sidpipe.config import Config, DataConfig, ModelConfig, PipelineConfig, TrainConfig
    from sidpipe.data import load_data
    from sidpipe.drivers.balance import auto_partition
    from sidpipe.models import build_net

    cfg = Config(
        model=ModelConfig(name=model),
        data=DataConfig(name="synthetic"),
        train=TrainConfig(batch_size=4),
        pipeline=PipelineConfig(stages=3, partition="auto"),
    )
    data = load_data(cfg.data, cfg.seed)
    net = build_net(cfg, data)
    plan = auto_partition(cfg, data, net, torch.device("cpu"))
    n = net.n_blocks
    assert len(plan["block_step_ms"]) == n and all(t > 0 for t in plan["block_step_ms"])
    assert len(plan["cuts"]) == 2 and 0 < plan["cuts"][0] < plan["cuts"][1] < n
    assert len(plan["predicted_stage_ms"]) == 3  # optimality: test_best_cuts_is_optimal
