"""`load_data`: a config's dataset, read and prepared for training.

Order of operations on the training set: subset (first N) -> stratified validation hold-out
(labels clean) -> symmetric label noise on what is left for training. Test is never touched.
"""

from __future__ import annotations

from typing import Any

import torch

from sidpipe.config import DATASET_NAMES, TEXT_DATASETS
from sidpipe.data.bundle import (
    _NOISE,
    _STATS,
    _VAL,
    DATASET_SHAPES,
    DataBundle,
    Split,
    _rng,
    resolve_root,
)
from sidpipe.data.images import (
    _IDX_DIRS,
    _load_cifar,
    _load_digits,
    _load_idx_dataset,
    _load_synthetic,
)
from sidpipe.data.splits import _stratified_holdout, _symmetric_noise, _take
from sidpipe.data.text import _load_text
from sidpipe.errors import DataConfigError


def _number(cfg: Any, key: str, default: float) -> float:
    v = getattr(cfg, key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
        raise DataConfigError(f"data.{key} must be a number in [0, 1) (got {v!r})")
    return float(v)


def load_data(cfg: Any, seed: int) -> DataBundle:
    """Load the dataset described by `cfg` (a DataConfig or anything with the same attributes;
    missing ones take their defaults) and apply subset, validation hold-out and label noise."""
    name = getattr(cfg, "name", "digits")
    if name not in DATASET_NAMES:
        raise DataConfigError(
            f"data.name={name!r} is unknown; choose one of {', '.join(DATASET_NAMES)}"
        )
    if name in TEXT_DATASETS:
        return _load_text(cfg, name, _number(cfg, "val_fraction", 0.0), seed)
    val_fraction = _number(cfg, "val_fraction", 0.0)
    label_noise = _number(cfg, "label_noise", 0.0)
    subset = getattr(cfg, "subset", None)
    bad_subset = isinstance(subset, bool) or not isinstance(subset, int) or subset < 1
    if subset is not None and bad_subset:
        raise DataConfigError(f"data.subset must be a positive integer or null (got {subset!r})")
    augment = getattr(cfg, "augment", None)
    if augment is not None and not isinstance(augment, bool):
        raise DataConfigError(f"data.augment must be true, false or null (got {augment!r})")
    download = bool(getattr(cfg, "download", False))

    if name == "digits":
        train, test, mean, std = _load_digits()
    elif name == "synthetic":
        train, test, mean, std = _load_synthetic()
    else:
        root = resolve_root(getattr(cfg, "root", None))
        if name in _IDX_DIRS:
            train, test = _load_idx_dataset(name, root, download)
        else:
            train, test = _load_cifar(name, root, download)
        mean, std = _STATS[name]
    num_classes = DATASET_SHAPES[name][1]

    if subset is not None and subset < len(train):
        train = Split(x=train.x[:subset], y=train.y[:subset])

    val = None
    if val_fraction > 0:
        tr_idx, va_idx = _stratified_holdout(train.y.numpy(), val_fraction, _rng(seed, _VAL))
        if len(va_idx) == 0 or len(tr_idx) == 0:
            raise DataConfigError(
                f"data.val_fraction={val_fraction} leaves an empty "
                f"{'validation' if len(va_idx) == 0 else 'training'} set "
                f"from {len(train)} training samples"
            )
        train, val = _take(train, tr_idx), _take(train, va_idx)

    noise_rate = 0.0
    if label_noise > 0:
        clean = train.y.numpy()
        noisy = _symmetric_noise(clean, label_noise, num_classes, _rng(seed, _NOISE))
        noise_rate = float((noisy != clean).mean())
        train = Split(x=train.x, y=torch.from_numpy(noisy), y_clean=train.y)

    c, h, w = train.x.shape[1:]
    return DataBundle(
        name=name,
        train=train,
        val=val,
        test=test,
        in_shape=(int(c), int(h), int(w)),
        num_classes=num_classes,
        mean=tuple(mean),
        std=tuple(std),
        augment=name.startswith("cifar") if augment is None else augment,
        noise_rate=noise_rate,
    )
