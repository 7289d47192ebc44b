"""The data layer: load a dataset into RAM as uint8 tensors and iterate it in seeded batches.

Every dataset here fits in memory (CIFAR-10 is 150 MB as uint8), so there is no DataLoader and
no worker process: rank 0 of the pipeline owns a `Batches` and slices tensors directly. That
keeps the order of samples a pure function of (seed, epoch), which the pipeline-equivalence
tests and mid-epoch resume both depend on.

Sources, all offline-first (docs/configuration.md, the data keys):
  digits         sklearn's bundled 8x8 digits (1,797 images), fixed stratified 80/20 split
                 (random_state=0 -> 1,437 train / 360 test). No files, no network.
  mnist          <root>/MNIST/raw/*-idx?-ubyte[.gz], read directly (nothing is written, so a
  fashion_mnist  read-only root works); <root>/FashionMNIST/raw/ likewise.
  cifar10        <root>/cifar-10-batches-py (torchvision), else the 4,000/1,000 subset at
                 <root>/CIFAR10/cifar10_subset.npz (with a warning).
  cifar100       <root>/cifar-100-python (torchvision), fine labels.
  shakespeare    <root>/shakespeare/shakespeare.txt.gz: byte-level text (see TextSplit)
  text           data.path: any file, read as bytes (gzip if it ends in .gz)
With data.download=true a missing dataset is fetched with torchvision into <root> (needs
network and a writable root); otherwise a missing dataset is a DataError that names the path.

Order of operations on the training set: subset (first N) -> stratified validation hold-out
(labels clean) -> symmetric label noise on what is left for training. Test is never touched.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sidpipe.config import DATASET_NAMES, TEXT_DATASETS, Config
from sidpipe.errors import DataConfigError, DataError
from sidpipe.tokenizer import TextTokenizer, encode_cached, text_tokenizer

log = logging.getLogger(__name__)


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

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}

# Stream tags: each random decision gets its own stream derived from the run seed, so adding a
# validation split does not change the label noise, and shuffling does not change augmentation.
_VAL, _NOISE, _SHUFFLE, _AUGMENT, _WINDOWS = 1, 2, 3, 4, 5
TEST_FRACTION = 0.05  # text sets: the last 5% of the bytes are the test split
_PAD = 4  # random-crop padding in pixels (the standard CIFAR recipe)


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


# ----------------------------------------------------------------------------- helpers


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


def _split(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> Split:
    x = torch.as_tensor(x, dtype=torch.uint8)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    assert x.ndim == 4 and x.shape[0] == y.shape[0], (x.shape, y.shape)
    return Split(x=x.contiguous(), y=y)


# ----------------------------------------------------------------------------- readers


def _load_synthetic() -> tuple[Split, Split, tuple[float, ...], tuple[float, ...]]:
    """CIFAR-shaped stand-in that needs no files: 10 classes, 10,000 train + 2,000 test
    images of 3x32x32. Each class is a fixed smooth random template; an image is its class
    template plus pixel noise: easy (nearest class mean gets every test image right), since
    it exists for throughput benchmarks on machines without the datasets, where speed does
    not depend on the pixels. Accuracies on it mean nothing. The same
    images on every machine (a fixed seed, independent of the run's)."""
    g = torch.Generator().manual_seed(20261127)
    n_train, n_test, k = 10_000, 2_000, 10
    coarse = torch.rand(k, 3, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")
    y = torch.randint(0, k, (n_train + n_test,), generator=g)
    noise = torch.randn(n_train + n_test, 3, 32, 32, generator=g) * 0.25
    x = ((templates[y] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    xf = x[:n_train].double() / 255.0
    mean = tuple(round(float(v), 4) for v in xf.mean(dim=(0, 2, 3)))
    std = tuple(round(float(v), 4) for v in xf.std(dim=(0, 2, 3)))
    return _split(x[:n_train], y[:n_train]), _split(x[n_train:], y[n_train:]), mean, std


def _load_digits() -> tuple[Split, Split, tuple[float, ...], tuple[float, ...]]:
    # Read the file scikit-learn ships (one row per image: 64 pixels 0..16, then the label)
    # instead of calling sklearn.datasets.load_digits: importing sklearn costs ~1 s of CPU in
    # every process that loads data, and every pipeline rank does, which was most of a small
    # run's start-up. find_spec locates the package without importing it.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data=digits reads scikit-learn's bundled digits: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"data=digits: {path} not found (scikit-learn without its datasets?)")
    rows = np.loadtxt(path, delimiter=",")
    # Pixels are 0..16; scale to uint8 0..255 so every dataset shares one normalisation path.
    x = np.rint(rows[:, :-1].reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    y = rows[:, -1].astype(np.int64)
    tr, te = _stratified_split(y, n_test=math.ceil(0.2 * len(y)), seed=0)
    xf = x[tr].astype(np.float64) / 255.0
    mean, std = (round(float(xf.mean()), 4),), (round(float(xf.std()), 4),)
    return _split(x[tr], y[tr]), _split(x[te], y[te]), mean, std


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


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    """Labels index the classes: anything outside 0..K-1 would train on garbage or crash in
    the loss, so it is refused here, naming the file (`where`)."""
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        values = ", ".join(str(v) for v in np.unique(y[bad])[:5])
        raise DataError(
            f"{where}: labels must be class indices 0..{num_classes - 1}, found {values} "
            f"({int(bad.sum())} of {y.size} labels); the file is damaged or not this dataset"
        )


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) without torchvision, which would try to write."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = bytearray(f.read())  # bytearray -> writable numpy view, no extra copy
    except (OSError, EOFError, zlib.error) as e:  # gzip: bad header, CRC, cut-off stream
        raise DataError(f"cannot read {path}: {_one_line(e) or type(e).__name__}") from e
    magic = int.from_bytes(data[:4], "big")
    if len(data) < 4 or magic >> 8 != 0x08:  # 0x08 = unsigned byte; MNIST uses nothing else
        raise DataError(f"{path} is not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    start = 4 + 4 * ndim
    if len(data) < start:
        raise DataError(
            f"{path} is damaged: its IDX header names {ndim} dimensions, but the file has "
            f"only {len(data)} bytes"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, np.uint8, offset=start)
    if arr.size != math.prod(dims):
        how = "truncated" if arr.size < math.prod(dims) else "damaged (extra bytes at the end)"
        raise DataError(f"{path} is {how}: its header says shape {dims}, found {arr.size} values")
    return arr.reshape(dims)


def _find_idx(raw: Path) -> tuple[list[Path], list[Path]]:
    """Return (found, missing): the .gz is preferred; an extracted file (torchvision leaves
    both) is accepted too. Missing ones are reported by their .gz name."""
    found, missing = [], []
    for stem in _IDX_FILES:
        gz, plain = raw / f"{stem}.gz", raw / stem
        if gz.is_file():
            found.append(gz)
        elif plain.is_file():
            found.append(plain)
        else:
            missing.append(gz)
    return found, missing


def _load_idx_dataset(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    folder = _IDX_DIRS[name]
    raw = root / folder / "raw"
    found, missing = _find_idx(raw)
    if missing and download:
        import torchvision

        cls = getattr(torchvision.datasets, folder)  # MNIST / FashionMNIST
        try:
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
        except Exception as e:  # any failure here means "could not download"
            raise DataError(
                f"{folder} is not in {raw} and downloading it failed (offline? "
                f"{type(e).__name__}: {_one_line(e)}); "
                f"with no network, copy the four IDX .gz files into {raw}"
            ) from e
        found, missing = _find_idx(raw)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"{folder} not found: missing {missing[0]}{more}. Copy the four IDX files "
            f"({', '.join(s + '.gz' for s in _IDX_FILES)}) into {raw}, or point data.root / "
            f"SIDPIPE_DATA at a folder containing {folder}/raw/, or pass data.download=true "
            f"(needs network)"
        )
    (_, h, w), classes = DATASET_SHAPES[name]
    splits = []
    for images_path, labels_path in (found[:2], found[2:]):
        x, y = _read_idx(images_path), _read_idx(labels_path)
        if x.ndim != 3 or x.shape[1:] != (h, w):
            raise DataError(
                f"{images_path}: expected {h}x{w} images (N, {h}, {w}), found shape "
                f"{list(x.shape)}; the file is damaged or not {name}"
            )
        if x.shape[0] == 0:
            raise DataError(f"{images_path} holds no images")
        if y.ndim != 1:
            raise DataError(f"{labels_path}: expected 1-D labels, found shape {list(y.shape)}")
        if y.shape[0] != x.shape[0]:
            raise DataError(
                f"{labels_path} has {y.shape[0]} labels but {images_path} has {x.shape[0]} "
                "images; the files are inconsistent"
            )
        _check_labels(y, classes, str(labels_path))
        splits.append(_split(x[:, None], y))
    return splits[0], splits[1]


def _from_torchvision(cls: Any, root: Path, download: bool) -> tuple[Split, Split]:
    """CIFAR python batches via torchvision: HWC uint8 `.data` and a `.targets` list.
    torchvision checks every file's md5 against the official archive before it unpickles
    it, so a damaged or crafted batch file is refused, never loaded."""
    out = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=download)
        out.append(_split(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), ds.targets))
    return out[0], out[1]


_SUBSET_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_subset(path: Path, num_classes: int) -> tuple[Split, Split]:
    """The CIFAR-10 subset .npz: HWC uint8 images and integer labels, plain arrays (no pickle:
    an object array is refused). Every way it can be damaged is one DataError naming it."""
    arrays: dict[str, np.ndarray] = {}
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - empty, not a zip, damaged zip: all "cannot read"
        raise DataError(f"cannot read {path}: {_one_line(e) or type(e).__name__}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):  # a single .npy array under the .npz name
        raise DataError(f"{path} is not an .npz archive (it holds a single {type(z).__name__})")
    with z:
        missing = [k for k in _SUBSET_KEYS if k not in z.files]
        if missing:
            raise DataError(
                f"{path} has no array {missing[0]!r} (it needs {', '.join(_SUBSET_KEYS)})"
            )
        for key in _SUBSET_KEYS:
            try:
                arrays[key] = np.asarray(z[key])
            except Exception as e:  # noqa: BLE001 - a damaged member or an object array
                raise DataError(
                    f"cannot read {key!r} from {path}: {_one_line(e) or type(e).__name__}"
                ) from e
    splits = []
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DataError(
                f"{path}: x_{part} must be uint8 images of shape (N, 32, 32, 3), found "
                f"{x.dtype} {list(x.shape)}"
            )
        if x.shape[0] == 0:
            raise DataError(f"{path}: x_{part} holds no images")
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{path}: y_{part} must be {x.shape[0]} integer labels (one per image of "
                f"x_{part}), found {y.dtype} {list(y.shape)}"
            )
        _check_labels(y.astype(np.int64), num_classes, f"{path} (y_{part})")
        splits.append(_split(x.transpose(0, 3, 1, 2), y))
    return splits[0], splits[1]


def _load_cifar(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    import torchvision

    cls, folder = {
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py"),
        "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python"),
    }[name]
    full = root / folder
    subset = root / "CIFAR10" / "cifar10_subset.npz"
    classes = DATASET_SHAPES[name][1]
    if full.is_dir():
        try:
            train, test = _from_torchvision(cls, root, download=False)
        except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted"
            raise DataError(
                f"{full} exists but could not be loaded ({_one_line(e)}); re-extract it"
            ) from e
        for split in (train, test):
            _check_labels(split.y.numpy(), classes, str(full))
        return train, test
    if name == "cifar10" and subset.is_file():
        log.warning(
            "cifar10: %s not found; using the 4,000-train / 1,000-test subset %s "
            "(accuracies are not comparable with full CIFAR-10)",
            full,
            subset,
        )
        return _read_subset(subset, classes)
    if download:
        try:
            return _from_torchvision(cls, root, download=True)
        except Exception as e:  # any failure here means "could not download"
            raise DataError(
                f"{name} is not in {full} and downloading it failed (offline? "
                f"{type(e).__name__}: {_one_line(e)}); "
                f"with no network, extract the python-version archive so that {full} exists"
            ) from e
    hint = f", or put the subset at {subset}" if name == "cifar10" else ""
    raise DataError(
        f"{name} not found: missing {full}. Extract the CIFAR python-version archive into "
        f"{root}{hint}, or point data.root / SIDPIPE_DATA at a folder that has it, "
        f"or pass data.download=true (needs network)"
    )


# ----------------------------------------------------------------------------- transforms


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


# ----------------------------------------------------------------------------- load_data


def _number(cfg: Any, key: str, default: float) -> float:
    v = getattr(cfg, key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
        raise DataConfigError(f"data.{key} must be a number in [0, 1) (got {v!r})")
    return float(v)


def _read_text(cfg: Any) -> tuple[Path, bytes]:
    if cfg.name == "text":
        if not getattr(cfg, "path", None):
            raise DataConfigError("data=text needs data.path=FILE (the text to train on)")
        path = Path(cfg.path).expanduser().absolute()
    else:
        path = resolve_root(getattr(cfg, "root", None)) / "shakespeare" / "shakespeare.txt.gz"
    if not path.is_file():
        hint = ("point data.root / SIDPIPE_DATA at a folder that holds shakespeare/"
                if cfg.name == "shakespeare" else "check data.path")  # fmt: skip
        raise DataError(f"text file {path} not found ({hint})")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {_one_line(e) or type(e).__name__}") from e
    if not raw:
        raise DataError(f"text file {path} is empty")
    return path, raw


def _char_boundary(raw: bytes, i: int) -> int:
    """The first position >= i that starts a UTF-8 character (continuation bytes are
    10xxxxxx): a BPE split point must not cut a character in two."""
    while i < len(raw) and raw[i] & 0xC0 == 0x80:
        i += 1
    return i


def _load_text(cfg: Any, name: str, val_fraction: float, seed: int) -> DataBundle:
    """Contiguous splits, in file order: train | validation | test (the last 5%). Windows
    never cross a split boundary, so no byte of one split is a target in another. With a BPE
    (data.tokenizer=bpe) the splits are cut on bytes (moved to a character boundary), the
    tokenizer is trained on the training split's bytes only, and each split is encoded on
    its own, so no token straddles two splits."""
    for key in ("label_noise", "augment"):
        if getattr(cfg, key, None):
            raise DataConfigError(f"data.{key} does not apply to text (data={name})")
    path, raw = _read_text(cfg)
    context = int(getattr(cfg, "context", 128))
    bpe = getattr(cfg, "tokenizer", "bytes") == "bpe"
    n = len(raw)
    n_test = int(round(TEST_FRACTION * n))
    n_val = int(round(val_fraction * n))
    cuts = [n - n_test - n_val, n - n_test]
    if bpe:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path} is not UTF-8 text (byte {e.start}): data.tokenizer=bpe reads UTF-8; "
                "data.tokenizer=bytes reads any file"
            ) from None
        cuts = [_char_boundary(raw, c) for c in cuts]
    spans = {"training": (0, cuts[0]), "validation": (cuts[0], cuts[1]), "test": (cuts[1], n)}
    tok = text_tokenizer(cfg, raw[: cuts[0]] if bpe else None)
    token_bytes = tok.token_bytes if bpe else None
    tokens = {k: encode_cached(tok, raw[a:b]) for k, (a, b) in spans.items()}
    subset = getattr(cfg, "subset", None)
    if subset is not None:  # the first N training windows
        tokens["training"] = tokens["training"][: subset * context + 1]
    unit = "tokens" if bpe else "bytes"
    for what, ids in tokens.items():
        if what == "validation" and not n_val:
            continue
        if ids.numel() < context + 1:
            raise DataConfigError(
                f"data.context={context} is longer than the {what} split of {path} "
                f"({ids.numel()} {unit}; a window needs context+1): use a shorter data.context "
                "or a longer text"
            )
    splits = {k: TextSplit(ids.clone(), context, token_bytes) for k, ids in tokens.items()}
    return DataBundle(
        name=name,
        train=splits["training"],
        val=splits["validation"] if n_val else None,
        test=splits["test"],
        in_shape=(context,),
        num_classes=tok.vocab_size,
        mean=(),
        std=(),
        augment=False,
        noise_rate=0.0,
        tokenizer=tok,
    )


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


# ----------------------------------------------------------------------------- batches


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


def text_bytes_per_token(data: DataBundle) -> float | None:
    """A text set's mean bytes per training token (tokens/s times it is text bytes/s, which
    compares across tokenizers); None for images."""
    return data.train.bytes_per_token() if isinstance(data.train, TextSplit) else None


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
