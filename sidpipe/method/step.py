"""The three single-process methods, each a step function and a per-depth evaluation.

`BlockwiseSID` is one `SIDLearner` over every block (the sequential reference of the SID
pipeline); `SharedSID` is the reference algorithm (a shared extractor trained by the sum of
the module losses); `Backprop` is end-to-end cross-entropy with gradients accumulated over
`pipeline.microbatches`, as the BP pipeline schedules do.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidpipe.config import Config, Method, Variant
from sidpipe.method.learner import SIDLearner, autocast, build_optimizer
from sidpipe.method.loss import at_least_fp32, sid_loss
from sidpipe.models import BlockNet
from sidpipe.models.heads import uniform_prior
from sidpipe.models.partition import Stage
from sidpipe.models.shared import SharedSIDNet


class BlockwiseSID:
    def __init__(self, cfg: Config, net: BlockNet, total: int, device: torch.device):
        self.net = net.to(device)
        self.device = device
        self.learner = SIDLearner(Stage(net, range(net.n_blocks)), cfg, total, device)
        self.optimizers, self.schedulers = self.learner.optimizers, self.learner.schedulers

    @property
    def messages(self) -> int:
        """Messages seen: sid.accumulate_steps counts them; checkpoints save it."""
        return self.learner.messages

    @messages.setter
    def messages(self, n: int) -> None:
        self.learner.messages = n

    def step(self, x: Tensor, y: Tensor) -> list[Tensor]:
        p0 = self.net.prior(x).float()
        _, _, losses, _ = self.learner.forward(x, p0, y)
        self.learner.update(losses)
        return [loss.detach() for loss in losses]

    def logits(self, x: Tensor) -> list[Tensor]:
        return self.learner.eval_forward(x, self.net.prior(x).float())[2]


class SharedSID:
    """The reference algorithm: two phases per batch, extractor trained by the summed losses."""

    def __init__(self, cfg: Config, net: SharedSIDNet, total: int, device: torch.device):
        self.cfg, self.net, self.device = cfg, net.to(device), device
        # One Adam for the extractor and one per module, as the reference code does.
        self.opts = [build_optimizer(net.extractor.parameters(), cfg.optim, total)]
        self.opts += [build_optimizer(m.parameters(), cfg.optim, total) for m in net.sid_modules]
        self.optimizers = [o for o, _ in self.opts]
        self.schedulers = [s for _, s in self.opts]

    def step(self, x: Tensor, y: Tensor) -> list[Tensor]:
        sid, net = self.cfg.sid, self.net
        net.train()
        with autocast(self.device, self.cfg.precision):
            z = net.extractor(x)
            # Phase 1: teacher beliefs with the current parameters, no gradient.
            with torch.no_grad():
                dtype = torch.promote_types(z.dtype, torch.float32)
                beliefs = [uniform_prior(x.shape[0], net.num_classes, x.device, dtype)]
                for g in net.sid_modules:
                    logits = g(torch.cat([beliefs[-1], z.detach()], 1))
                    beliefs.append(F.softmax(at_least_fp32(logits), 1))
            # Phase 2: every module fits its own loss given the detached previous belief.
            losses = [
                sid_loss(
                    g(torch.cat([beliefs[i], z], 1)),
                    y,
                    beliefs[i],
                    sid.alpha,
                    sid.kl_direction,
                    sid.label_smoothing,
                )
                for i, g in enumerate(net.sid_modules)
            ]
        for opt, _ in self.opts:
            opt.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()
        for opt, sched in self.opts:
            opt.step()
            if sched is not None:
                sched.step()
        return [loss.detach() for loss in losses]

    @torch.no_grad()
    def logits(self, x: Tensor) -> list[Tensor]:
        self.net.eval()
        with autocast(self.device, self.cfg.precision):
            return [z.float() for z in self.net(x)]


class Backprop:
    """End-to-end cross-entropy on the last head, gradients accumulated over microbatches."""

    def __init__(self, cfg: Config, net: nn.Module, total: int, device: torch.device):
        self.cfg, self.net, self.device = cfg, net.to(device), device
        if isinstance(net, SharedSIDNet):  # the reference repo's BP network: the same chain
            params = list(net.parameters())
            self._fwd = lambda x: net(x)[-1]
        else:
            params = [p for b in net.blocks for p in b.parameters()] + list(
                net.heads[-1].parameters()
            )
            self._fwd = net.bp_forward
        self.opt, self.sched = build_optimizer(params, cfg.optim, total)
        self.optimizers, self.schedulers = [self.opt], [self.sched]

    def step(self, x: Tensor, y: Tensor) -> list[Tensor]:
        self.net.train()
        m = min(self.cfg.pipeline.microbatches, x.shape[0])
        total = torch.zeros((), device=x.device)
        for xm, ym in zip(x.tensor_split(m), y.tensor_split(m)):
            with autocast(self.device, self.cfg.precision):
                loss = F.cross_entropy(self._fwd(xm).float().flatten(0, -2), ym.flatten())
            (loss / m).backward()
            total += loss.detach() / m
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sched is not None:
            self.sched.step()
        return [total]

    @torch.no_grad()
    def logits(self, x: Tensor) -> list[Tensor]:
        self.net.eval()
        with autocast(self.device, self.cfg.precision):
            return [self._fwd(x).float()]


def make_method(cfg: Config, net: nn.Module, total: int, device: torch.device):
    if cfg.method is Method.bp:
        return Backprop(cfg, net, total, device)
    if cfg.sid.variant is Variant.shared:
        return SharedSID(cfg, net, total, device)
    return BlockwiseSID(cfg, net, total, device)


def depth_scores(logits: list[Tensor], y: Tensor) -> Tensor:
    """Per depth [hits, count, summed negative log-likelihood in nats] (float64, one row per
    logits tensor); a language model's positions each count as a prediction."""
    rows = []
    for z in logits:
        z2, y2 = z.float().flatten(0, -2), y.flatten()
        nll = F.cross_entropy(z2, y2, reduction="sum")
        rows.append(torch.stack([(z2.argmax(-1) == y2).sum().double(),
                                 torch.tensor(y2.numel(), dtype=torch.float64, device=y.device),
                                 nll.double()]))  # fmt: skip
    return torch.stack(rows)


LN2 = math.log(2.0)


def evaluate_split(method: Any, batches: Any, device: torch.device) -> dict[str, list[float]]:
    """Every depth's accuracy and cross-entropy in bits per prediction (bits per byte for a
    language model, whatever its tokenizer); the last entry is the network's prediction."""
    total: Tensor | None = None
    for x, y in batches.epoch(0):
        x, y = x.to(device), y.to(device)
        scores = depth_scores(method.logits(x), y)
        total = scores if total is None else total + scores
    assert total is not None, "empty evaluation split"
    return {"accuracy": (total[:, 0] / total[:, 1]).tolist(),
            "bits": (total[:, 2] / bit_units(batches, total[:, 1]) / LN2).tolist()}  # fmt: skip


def bit_units(batches: Any, count: Tensor) -> Tensor | int:
    """What a split's nats are divided by: the bytes its targets stand for when it is text
    (bits per byte whatever the tokenizer, so rows with different tokenizers compare: a BPE
    token covering 4 bytes is not one prediction of a byte), else the prediction count."""
    units = getattr(batches, "scored_bytes", None)
    return count if units is None else units


def evaluate(method: Any, batches: Any, device: torch.device) -> list[float]:
    """Accuracy of every depth's belief (the last entry is the network's prediction)."""
    return evaluate_split(method, batches, device)["accuracy"]
