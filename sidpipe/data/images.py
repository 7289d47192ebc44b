"""The image datasets' readers: each returns one dataset's (train, test) `Split`s in the
file's order (digits and synthetic also their normalisation constants), every file checked
against `DATASET_SHAPES` and its labels against the classes, a damaged one a one-line
DataError that names it.

Sources, all offline-first (docs/configuration.md, the data keys):
  digits         sklearn's bundled 8x8 digits (1,797 images), fixed stratified 80/20 split
                 (random_state=0 -> 1,437 train / 360 test). No files, no network.
  mnist          <root>/MNIST/raw/*-idx?-ubyte[.gz], read directly (nothing is written, so a
  fashion_mnist  read-only root works); <root>/FashionMNIST/raw/ likewise.
  cifar10        <root>/cifar-10-batches-py (torchvision), else the 4,000/1,000 subset at
                 <root>/CIFAR10/cifar10_subset.npz (with a warning).
  cifar100       <root>/cifar-100-python (torchvision), fine labels.
  synthetic      CIFAR-shaped stand-in generated in memory, for throughput benchmarks.
With data.download=true a missing dataset is fetched with torchvision into <root> (needs
network and a writable root); otherwise a missing dataset is a DataError that names the path.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sidpipe.data.bundle import DATASET_SHAPES, Split, _one_line
from sidpipe.data.splits import _stratified_split
from sidpipe.errors import DataError

# Named for the package, not this module: the data layer's warnings keep the logger name they
# had when it was one module (what a log filter or caplog selects).
log = logging.getLogger("sidpipe.data")

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _split(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> Split:
    x = torch.as_tensor(x, dtype=torch.uint8)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    assert x.ndim == 4 and x.shape[0] == y.shape[0], (x.shape, y.shape)
    return Split(x=x.contiguous(), y=y)


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
