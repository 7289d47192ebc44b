"""Stratified splits, the validation hold-out and label noise (sidpipe/data/splits.py).
Label-noise rates are checked on MNIST (60,000 labels, so +-0.02 is > 10 sigma); digits
(1,437) is used for everything else."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from sidpipe.data import DataBundle, Split, load_data
from tests.data.conftest import Cfg, needs_mnist


def _pairs(s: Split) -> Counter:
    """Multiset of (image bytes, label): compares splits without needing sample indices."""
    return Counter((x.numpy().tobytes(), int(y)) for x, y in zip(s.x, s.y, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("counts", [[5, 5, 5], [2, 9, 3, 3, 7], [40, 3, 17, 17, 17]])
def test_stratified_split_draws_as_sklearn(seed: int, counts: list[int]) -> None:
    """Ties in the rounding (equal class sizes) use the random stream: those cases too."""
    from sklearn.model_selection import train_test_split

    from sidpipe.data.splits import _stratified_split

    y = np.random.RandomState(seed + 100).permutation(np.repeat(np.arange(len(counts)), counts))
    for n_test in (len(counts), len(y) // 3, len(y) - len(counts)):
        tr, te = train_test_split(np.arange(len(y)), test_size=n_test, stratify=y,
                                  random_state=seed)  # fmt: skip
        ours = _stratified_split(y, n_test=n_test, seed=seed)
        assert [a.tolist() for a in ours] == [np.sort(tr).tolist(), np.sort(te).tolist()]


# ----------------------------------------------------------------------------- label noise


@needs_mnist
@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_label_noise_on_mnist(mnist: DataBundle, rate: float) -> None:
    b = load_data(Cfg("mnist", label_noise=rate), seed=7)
    y, clean = b.train.y, b.train.y_clean
    assert clean is not None and torch.equal(clean, mnist.train.y)
    changed = y != clean
    assert abs(b.noise_rate - rate) <= 0.02
    assert b.noise_rate == pytest.approx(changed.float().mean().item())
    # A changed label is a uniformly drawn *other* class: offsets 1..9 each ~1/9 of flips.
    offsets = torch.bincount((y[changed] - clean[changed]) % 10, minlength=10)
    assert offsets[0] == 0 and ((offsets[1:] / changed.sum() - 1 / 9).abs() < 0.01).all()
    assert torch.equal(b.test.y, mnist.test.y) and b.test.y_clean is None
    assert torch.equal(b.train.x, mnist.train.x)
    same = load_data(Cfg("mnist", subset=1000, label_noise=rate), seed=7)
    assert torch.equal(same.train.y, y[:1000])  # seeded: same seed, same noise


def test_label_noise_digits_seeded_and_val_clean(digits: DataBundle) -> None:
    a = load_data(Cfg(label_noise=0.4, val_fraction=0.2), seed=3)
    b = load_data(Cfg(label_noise=0.4, val_fraction=0.2), seed=3)
    c = load_data(Cfg(label_noise=0.4, val_fraction=0.2), seed=4)
    assert torch.equal(a.train.y, b.train.y) and a.noise_rate == b.noise_rate
    assert not torch.equal(a.train.y, c.train.y)
    assert 0.3 < a.noise_rate < 0.5
    assert a.val is not None and a.val.y_clean is None
    # Val labels are the true ones: every (image, label) pair occurs in the clean train set.
    assert not _pairs(a.val) - _pairs(digits.train)
    assert torch.equal(a.test.y, digits.test.y)


# ----------------------------------------------------------------------------- validation split


def test_val_split(digits: DataBundle) -> None:
    b = load_data(Cfg(val_fraction=0.2), seed=0)
    assert b.val is not None
    assert (len(b.train), len(b.val)) == (1150, 287)  # round(0.2 * 1437) = 287
    # Disjoint and complete: train + val is exactly the original training multiset.
    assert _pairs(b.train) + _pairs(b.val) == _pairs(digits.train)
    # Stratified: each class contributes 20% of its samples, to within one.
    per_class = torch.bincount(digits.train.y, minlength=10).float()
    assert ((torch.bincount(b.val.y, minlength=10) - 0.2 * per_class).abs() <= 1).all()
    again = load_data(Cfg(val_fraction=0.2), seed=0)
    other = load_data(Cfg(val_fraction=0.2), seed=1)
    assert torch.equal(again.val.x, b.val.x) and not torch.equal(other.val.x, b.val.x)
    assert torch.equal(b.test.x, digits.test.x)
