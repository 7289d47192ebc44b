"""What a loaded dataset is: `Split` (images), `TextSplit` (a run of tokens) and the
`DataBundle` that holds a dataset's splits and facts; the facts known without reading a file
(`DATASET_SHAPES`, the normalisation constants); where the data root is; and the seeded
random streams every random decision of the package draws from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sidpipe.config import DATASET_NAMES, TEXT_DATASETS
from sidpipe.tokenizer import TextTokenizer

# Per-channel mean/std of the training pixels scaled to [0, 1]. The CIFAR stds are the true
# per-pixel stds (0.247...), not the often-copied 0.2023/0.1994/0.2010 (std of image means).
# digits has no canonical constants: they are computed from its fixed training split.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# (C, H, W) of the images and the number of classes: fixed by each dataset, so they are known
# (for `sidpipe eval`'s model/data check) without reading a file, and every file is checked
# against them when it is read.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "synthetic": ((3, 32, 32), 10),
}
assert set(DATASET_SHAPES) | set(TEXT_DATASETS) == set(DATASET_NAMES)

# Stream tags: each random decision gets its own stream derived from the run seed, so adding a
# validation split does not change the label noise, and shuffling does not change augmentation.
_VAL, _NOISE, _SHUFFLE, _AUGMENT, _WINDOWS = 1, 2, 3, 4, 5


@dataclass
class Split:
    x: Tensor  # uint8 (N, C, H, W); Batches turns it into normalised float32
    y: Tensor  # int64 (N,); for a noisy training split, the noisy labels
    y_clean: Tensor | None = None  # the original labels when label noise was applied, else None

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class TextSplit:
    """A contiguous run of bytes. Its samples are windows of `context` input bytes and the
    `context` bytes that follow each (the next-byte targets), so a window spans context+1
    bytes. Its length is the number of disjoint windows (one epoch = about one pass)."""

    data: Tensor  # token ids (N,): uint8 bytes, or int32 ids of a BPE
    context: int
    token_bytes: Tensor | None = None  # int64 (V,): bytes per token id; None: bytes (all 1)

    def __len__(self) -> int:
        return max(0, (int(self.data.numel()) - 1) // self.context)

    def bytes_per_token(self) -> float:
        """The mean bytes of text a token of this split stands for (1 for bytes)."""
        if self.token_bytes is None or not self.data.numel():
            return 1.0
        return float(self.token_bytes[self.data.long()].sum()) / self.data.numel()

    def scored_bytes(self) -> int:
        """The bytes that evaluation's targets stand for (the disjoint windows' next tokens,
        `TextBatches` in order): bits per byte divide a split's nats by this, so models with
        different tokenizers compare. For bytes it is the number of targets."""
        targets = self.data[1 : len(self) * self.context + 1]
        if self.token_bytes is None:
            return int(targets.numel())
        return int(self.token_bytes[targets.long()].sum())


@dataclass
class DataBundle:
    name: str
    train: Split | TextSplit
    val: Split | TextSplit | None
    test: Split | TextSplit
    in_shape: tuple[int, ...]  # (C, H, W); text: (context,)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # random crop (pad 4) + hflip on training batches
    noise_rate: float  # realised fraction of training labels changed by label noise
    tokenizer: TextTokenizer | None = None  # text sets: how the text became tokens


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """data.root if given, else $SIDPIPE_DATA, else ./data. Empty means unset."""
    chosen = root or os.environ.get("SIDPIPE_DATA") or "data"
    return Path(chosen).expanduser().absolute()


def _seed_for(*keys: int) -> int:
    """Mix integers into one 63-bit seed. SeedSequence hashes well and accepts any non-negative
    ints, so seed, epoch and batch index cannot collide the way seed + epoch would."""
    entropy = [k % 2**64 for k in keys]  # negative seeds are legal for the user
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1])) & (2**63 - 1)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(_seed_for(*keys))


def _torch_gen(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_for(*keys))


def _one_line(e: BaseException) -> str:
    """torchvision's download errors span lines; DataError messages must not."""
    return " ".join(str(e).split())
