"""Seeded batches (sidpipe/data/batches.py): order, resume mid-epoch, augmentation."""

from __future__ import annotations

import logging

import pytest
import torch

from sidpipe.data import Batches, DataBundle, load_data
from tests.data.conftest import Cfg, needs_cifar


def _all_batches(b: Batches, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(b.epoch(epoch, start=start))


# ----------------------------------------------------------------------------- Batches


def test_batches_order_and_resume(digits: DataBundle) -> None:
    def make(seed: int = 0, **kw: bool) -> Batches:
        return Batches(digits.train, digits, 100, shuffle=True, seed=seed, **kw)

    b = make()
    assert len(b) == 15 and len(make(drop_last=True)) == 14
    e0 = _all_batches(b, 0)
    assert [len(y) for _, y in e0] == [100] * 14 + [37]
    assert [len(y) for _, y in _all_batches(make(drop_last=True), 0)] == [100] * 14
    # A permutation of the split each epoch.
    assert torch.equal(torch.cat([y for _, y in e0]).sort().values, digits.train.y.sort().values)
    # Same seed, fresh object: identical batches. Epoch k does not depend on epochs before it.
    again = _all_batches(make(), 0)
    assert all(
        torch.equal(x1, x2) and torch.equal(y1, y2)
        for (x1, y1), (x2, y2) in zip(e0, again, strict=True)
    )
    e1 = _all_batches(b, 1)
    assert not torch.equal(e0[0][0], e1[0][0])
    assert torch.equal(_all_batches(make(), 1)[3][0], e1[3][0])
    assert not torch.equal(_all_batches(make(seed=1), 0)[0][0], e0[0][0])
    # Resume mid-epoch: start=k yields the tail of the same order.
    tail = _all_batches(b, 0, start=12)
    assert len(tail) == 3
    assert all(torch.equal(t[0], f[0]) for t, f in zip(tail, e0[12:], strict=True))
    assert _all_batches(b, 0, start=15) == []
    with pytest.raises(ValueError, match="start"):
        b.epoch(0, start=16)
    # No shuffle: file order, normalised float32.
    (x, y), *_ = Batches(digits.train, digits, 500, shuffle=False, seed=0).epoch(0)
    assert torch.equal(y, digits.train.y[:500]) and x.dtype == torch.float32
    expect = (digits.train.x[:500].float() / 255 - digits.mean[0]) / digits.std[0]
    assert torch.allclose(x, expect, atol=1e-6)


# ----------------------------------------------------------------------------- CIFAR-10 subset


@needs_cifar
def test_cifar10_subset_and_augmentation(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sidpipe.data"):
        b = load_data(Cfg("cifar10"), seed=0)
    assert "subset" in caplog.text
    assert (len(b.train), len(b.test)) == (4000, 1000)
    assert b.in_shape == (3, 32, 32) and b.augment is True
    assert torch.bincount(b.train.y).tolist()[:3] == [396, 366, 420]  # data README

    def batches(seed: int, augment: bool, start: int = 0) -> list:
        return _all_batches(Batches(b.train, b, 500, True, seed, augment=augment), 0, start)

    plain, aug = batches(0, False), batches(0, True)
    assert [x.shape for x, _ in aug] == [x.shape for x, _ in plain]
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(plain, aug, strict=True))
    assert not torch.equal(plain[0][0], aug[0][0])
    assert all(torch.equal(a[0], c[0]) for a, c in zip(aug, batches(0, True), strict=True))
    assert not torch.equal(aug[0][0], batches(1, True)[0][0])
    tail = batches(0, True, start=5)  # resume mid-epoch: same augmentation as unbroken run
    assert all(torch.equal(a[0], c[0]) for a, c in zip(aug[5:], tail, strict=True))

    # Each augmented image is exactly some 32x32 crop of the black-padded image, maybe flipped.
    mean, std = torch.tensor(b.mean).view(3, 1, 1), torch.tensor(b.std).view(3, 1, 1)
    orig = next(Batches(b.train, b, 8, shuffle=False, seed=0).epoch(0))[0] * std + mean
    augd = next(Batches(b.train, b, 8, shuffle=False, seed=0, augment=True).epoch(0))[0]
    augd = augd * std + mean
    padded = torch.nn.functional.pad(orig, (4, 4, 4, 4))
    crops = torch.stack(
        [  # (9, 9, 8, 3, 32, 32): every crop offset of every image
            torch.stack([padded[:, :, dy : dy + 32, dx : dx + 32] for dx in range(9)])
            for dy in range(9)
        ]
    )
    crops = torch.cat([crops, crops.flip(-1)]).flatten(0, 1)  # (162, 8, 3, 32, 32)
    match = ((crops - augd).abs() < 1e-5).flatten(2).all(-1)  # (162, 8)
    assert match.any(0).all()
