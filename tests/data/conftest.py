"""Shared by the data tests: the data root, the config stand-in, and the loaded datasets.

The data root is $SIDPIPE_DATA, else the `shared/data` folder beside the repository checkout.
It is read-only in CI and nothing is ever copied out of it; MNIST / Fashion-MNIST / CIFAR tests
skip (with the path in the reason) where their files are absent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidpipe.data import DataBundle, load_data
from tests.conftest import REPO

DATA = Path(os.environ.get("SIDPIPE_DATA") or REPO.parent / "shared" / "data")


def _needs(rel: str) -> pytest.MarkDecorator:
    path = DATA / rel
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not found (set SIDPIPE_DATA)")


needs_mnist = _needs("MNIST/raw")
needs_fashion = _needs("FashionMNIST/raw")
needs_cifar = _needs("CIFAR10/cifar10_subset.npz")


@dataclass
class Cfg:  # the attributes load_data reads; DataConfig has the same ones
    name: str = "digits"
    root: str | None = str(DATA)
    download: bool = False
    val_fraction: float = 0.0
    label_noise: float = 0.0
    augment: bool | None = None
    subset: int | None = None


# Package scope: loaded once for all the data tests, which only read them.
@pytest.fixture(scope="package")
def digits() -> DataBundle:
    return load_data(Cfg(), seed=0)


@pytest.fixture(scope="package")
def mnist() -> DataBundle:
    return load_data(Cfg("mnist"), seed=0)
