"""Choosing samples by label: stratified splits (digits' fixed test split, drawn as
scikit-learn draws it; the run-seeded validation hold-out), symmetric label noise, and taking
a `Split`'s samples by index. Each draws from the random stream it is given, no other."""

from __future__ import annotations

import math

import numpy as np
import torch

from sidpipe.data.bundle import Split


def _stratified_split(y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of a stratified shuffle split, sorted so that each part keeps the
    file's order ("first N" of a subset stays meaningful), drawn exactly as
    scikit-learn's train_test_split(stratify=y, random_state=seed) draws them (the digits
    split predates this function; a test holds the two equal): each class's train and test
    counts are its share of the totals rounded down, the remainders going to the largest
    fractional parts (ties broken at random), then each class is permuted and cut."""
    rng = np.random.RandomState(seed)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    n_train = _apportion(counts, len(y) - n_test, rng)
    n_tests = _apportion(counts - n_train, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for idx, a, b in zip(members, n_train, n_tests):
        shuffled = idx.take(rng.permutation(len(idx)))
        train.extend(shuffled[:a])
        test.extend(shuffled[a : a + b])
    return np.sort(np.array(train)), np.sort(np.array(test))


def _apportion(counts: np.ndarray, n: int, rng: np.random.RandomState) -> np.ndarray:
    """n draws shared among classes in proportion to counts (largest-remainder rounding)."""
    share = counts / counts.sum() * n
    out = np.floor(share)
    left = int(n - out.sum())
    remainder = share - out
    for value in np.unique(remainder)[::-1]:  # the largest remainders first
        if left == 0:
            break
        (tied,) = np.where(remainder == value)
        take = min(len(tied), left)
        out[rng.choice(tied, size=take, replace=False)] += 1
        left -= take
    return out.astype(int)


def _stratified_holdout(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val) with round(fraction * N) val samples, allotted to classes
    by largest remainder so each class keeps its share. Both index lists come back sorted."""
    classes, counts = np.unique(y, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    short = int(math.floor(fraction * len(y) + 0.5)) - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    val = [
        np.flatnonzero(y == c)[rng.permutation(n)[:k]]
        for c, n, k in zip(classes, counts, take, strict=True)
    ]
    val_idx = np.sort(np.concatenate(val))
    train_mask = np.ones(len(y), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def _symmetric_noise(
    y: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Each label with probability `rate` becomes a uniformly drawn *different* class: adding a
    shift in 1..K-1 modulo K can never land on the original. Sample i uses row i of one
    (N, 2) draw, so the noise on a prefix (data.subset) matches the noise of the full set."""
    u = rng.random((len(y), 2))
    flip = u[:, 0] < rate
    shift = 1 + np.floor(u[:, 1] * (num_classes - 1)).astype(np.int64)
    return np.where(flip, (y + shift) % num_classes, y)


def _take(s: Split, idx: np.ndarray) -> Split:
    t = torch.from_numpy(idx)
    return Split(x=s.x[t], y=s.y[t])
