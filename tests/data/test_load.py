"""load_data's configuration (sidpipe/data/load.py): subset, the checks on the data keys,
and where the data root is (resolve_root)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sidpipe.config import DATASET_NAMES
from sidpipe.data import DataBundle, load_data, resolve_root
from sidpipe.errors import DataError
from tests.data.conftest import Cfg


def test_subset_keeps_first_n(digits: DataBundle) -> None:
    b = load_data(Cfg(subset=100), seed=0)
    assert len(b.train) == 100 and len(b.test) == 360
    assert torch.equal(b.train.x, digits.train.x[:100])


def test_bad_config_values_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"data\.name='foo' is unknown; choose one of digits"):
        load_data(Cfg("foo"), seed=0)
    with pytest.raises(DataError, match=r"data\.name"):  # also a DataError, for the CLI
        load_data(Cfg("foo"), seed=0)
    for key, value in [("val_fraction", 1.0), ("label_noise", -0.1), ("subset", 0)]:
        with pytest.raises(ValueError, match=rf"data\.{key}"):
            load_data(replace(Cfg(), **{key: value}), seed=0)
    assert "digits" in DATASET_NAMES and "cifar100" in DATASET_NAMES


def test_resolve_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIDPIPE_DATA", str(tmp_path / "env"))
    assert resolve_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("SIDPIPE_DATA")
    monkeypatch.chdir(tmp_path)
    assert resolve_root(None) == tmp_path / "data"
