"""Seeded batch iterators over a loaded dataset's splits.

Every dataset fits in memory (CIFAR-10 is 150 MB as uint8), so there is no DataLoader and no
worker process: rank 0 of the pipeline owns a `Batches` and slices tensors directly. That
keeps the order of samples a pure function of (seed, epoch), which the pipeline-equivalence
tests and mid-epoch resume both depend on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sidpipe.config import Config
from sidpipe.data.bundle import (
    _AUGMENT,
    _SHUFFLE,
    _WINDOWS,
    DataBundle,
    Split,
    TextSplit,
    _torch_gen,
)

_PAD = 4  # random-crop padding in pixels (the standard CIFAR recipe)


class _EpochBatches:
    """What image and text batches share: the batch count, and epoch(k, start=b) yielding
    batches b..len-1 of epoch k, each a function of (seed, k, b) alone (so a resume sees
    exactly the batches an uninterrupted run would have)."""

    def __init__(
        self,
        split: Split | TextSplit,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        device: torch.device | str | None,
        host: torch.device,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1 (got {batch_size})")
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.seed, self.drop_last = seed, drop_last
        self.device = torch.device(device) if device is not None else host

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        if not 0 <= start <= len(self):
            raise ValueError(f"start={start} is outside 0..{len(self)} batches per epoch")
        return self._iter(epoch, start)

    def _iter(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError


class Batches(_EpochBatches):
    """Deterministic in-memory image batches (no DataLoader workers: data is small and in RAM):
    (x float32 normalised (B,C,H,W), y int64 (B,)).

    Epoch k's order and augmentation depend only on (seed, k) -- and augmentation of batch b
    only on (seed, k, b). `device` (an addition to the spec) keeps the uint8 data on that
    device once, so batches are sliced, augmented and normalised there.
    """

    def __init__(
        self,
        split: Split,
        bundle: DataBundle,
        batch_size: int,
        shuffle: bool,
        seed: int,
        augment: bool = False,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(split, batch_size, shuffle, seed, drop_last, device, split.x.device)
        self.augment = augment
        self._x = split.x.to(self.device)
        self._y = split.y.to(self.device)
        c = len(bundle.mean)
        self._mean = torch.tensor(bundle.mean, device=self.device).view(1, c, 1, 1)
        self._std = torch.tensor(bundle.std, device=self.device).view(1, c, 1, 1)

    def _iter(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        n, bs = len(self.split), self.batch_size
        if self.shuffle:
            order = torch.randperm(n, generator=_torch_gen(self.seed, epoch, _SHUFFLE))
        else:
            order = torch.arange(n)
        order = order.to(self.device)
        for b in range(start, len(self)):
            idx = order[b * bs : (b + 1) * bs]
            x = self._x[idx].float().div_(255.0)
            if self.augment:
                x = self._augment(x, _torch_gen(self.seed, epoch, b, _AUGMENT))
            yield x.sub_(self._mean).div_(self._std), self._y[idx]

    def _augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Random crop from a zero-padded (black, as torchvision pads before normalising) image
        plus a horizontal flip with p=0.5, for the whole batch in one gather."""
        b, _, h, w = x.shape
        # Random numbers come from a CPU generator (device-independent), then move to x.
        dy = torch.randint(0, 2 * _PAD + 1, (b,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * _PAD + 1, (b,), generator=g).to(x.device)
        flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
        padded = torch.nn.functional.pad(x, (_PAD, _PAD, _PAD, _PAD))
        rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
        # Flipping = reading the crop's columns right to left.
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=x.device)[:, None, None]
        # Advanced indices around a slice put the indexed dims first: (B, H, W, C).
        out = padded[bi, :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()


class TextBatches(_EpochBatches):
    """Batches of byte windows, with the interface of `Batches`: (x, y), both int64 (B, T),
    y = x shifted by one byte. Training (shuffle): each batch draws B window starts anywhere
    in the split from (seed, epoch, batch index) alone, so a resume reproduces it exactly.
    Evaluation: the disjoint windows in order, every byte of the split scored once."""

    def __init__(
        self,
        split: TextSplit,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(split, batch_size, shuffle, seed, drop_last, device, split.data.device)
        self._data = split.data.to(self.device)
        self._offsets = torch.arange(split.context + 1, device=self.device)

    @property
    def scored_bytes(self) -> int:
        """The bytes an evaluation pass's targets stand for: the denominator of bits per
        byte (`TextSplit.scored_bytes`)."""
        return self.split.scored_bytes()  # type: ignore[union-attr]

    def _iter(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        bs, t = self.batch_size, self.split.context
        last_start = self._data.numel() - t - 1  # the last window's first byte
        for b in range(start, len(self)):
            if self.shuffle:
                g = _torch_gen(self.seed, epoch, b, _WINDOWS)
                starts = torch.randint(0, last_start + 1, (bs,), generator=g)
            else:
                starts = torch.arange(b * bs, min((b + 1) * bs, len(self.split))) * t
            w = self._data[starts.to(self.device)[:, None] + self._offsets].long()
            yield w[:, :-1], w[:, 1:]


def shuffled_batches(data: DataBundle, batch_size: int, seed: int) -> Batches | TextBatches:
    """Seeded training batches (images, or windows of a text) on the host: for profiling."""
    if isinstance(data.train, TextSplit):
        return TextBatches(data.train, batch_size, True, seed)
    return Batches(data.train, data, batch_size, True, seed)


def train_batches(
    cfg: Config, data: DataBundle, device: torch.device | None = None, drop_last: bool = False
) -> Batches | TextBatches:
    """device: keep the images there once (a GPU slices, augments and normalises its own
    batches; no per-batch host work or copy). Same values as on the CPU."""
    device = device if cfg.train.data_on_device else None
    if isinstance(data.train, TextSplit):
        return TextBatches(data.train, cfg.train.batch_size, True, cfg.seed, drop_last, device)
    return Batches(
        data.train, data, cfg.train.batch_size, shuffle=True, seed=cfg.seed,
        augment=data.augment, drop_last=drop_last, device=device,
    )  # fmt: skip


def eval_splits(
    cfg: Config, data: DataBundle, device: torch.device | None = None
) -> dict[str, Batches | TextBatches]:
    device = device if cfg.train.data_on_device else None
    splits = {"test": data.test} | ({"val": data.val} if data.val is not None else {})
    if isinstance(data.test, TextSplit):
        return {name: TextBatches(split, cfg.train.eval_batch_size, False, cfg.seed,  # type: ignore[arg-type]
                                  device=device) for name, split in splits.items()}  # fmt: skip
    return {
        name: Batches(split, data, cfg.train.eval_batch_size, False, cfg.seed, device=device)
        for name, split in splits.items()
    }
