"""SIDLearner: one optimizer per stage is the same method as one optimizer per module."""

from __future__ import annotations

import pytest
import torch

from sidpipe.config import Config, ModelConfig, OptimConfig
from sidpipe.method.learner import SIDLearner
from sidpipe.models import build_model
from sidpipe.models.heads import uniform_prior
from sidpipe.models.partition import Stage


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("fused", [True, False])
def test_one_optimizer_per_stage_equals_one_per_module(name, fused):
    learners = []
    for per_module in (False, True):
        cfg = Config(
            model=ModelConfig(name="mlp", width=32, depth=3),
            optim=OptimConfig(
                name=name, lr=1e-2, weight_decay=1e-3, schedule="cosine",
                fused=fused, per_module=per_module,
            ),
        )  # fmt: skip
        torch.manual_seed(0)
        net = build_model(cfg.model, (1, 8, 8), 10)
        learners.append(SIDLearner(Stage(net, range(3)), cfg, 10, torch.device("cpu")))
    assert [len(s.optimizers) for s in learners] == [1, 3]
    init = [q.detach().clone() for q in learners[0].stage.parameters()]
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        for learner in learners:
            _, _, losses, _ = learner.forward(x, uniform_prior(16, 10), y)
            learner.update(losses)
    pairs = zip(learners[0].stage.parameters(), learners[1].stage.parameters(), init, strict=True)
    for a, b, a0 in pairs:
        assert torch.equal(a, b)
        assert not torch.equal(a, a0)
