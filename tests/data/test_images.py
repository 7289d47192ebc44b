"""The image readers (sidpipe/data/images.py) through load_data, on the real offline
datasets and on small damaged copies built in tmp_path."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from sidpipe.data import Batches, DataBundle, load_data
from sidpipe.errors import DataError
from tests.data.conftest import DATA, Cfg, needs_fashion, needs_mnist

# Class counts from shared/data/README.md.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_and_fixed_split(digits: DataBundle) -> None:
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.in_shape == (1, 8, 8) and digits.num_classes == 10
    assert digits.train.x.dtype == torch.uint8 and digits.train.y.dtype == torch.int64
    assert digits.train.x.shape == (1437, 1, 8, 8)
    assert digits.val is None and digits.noise_rate == 0.0 and digits.augment is False
    # Stratified 80/20: every class has 35-37 test samples (178-183 per class in total).
    assert set(torch.bincount(digits.test.y).tolist()) <= {35, 36, 37}
    # Fixed split: independent of the run seed, identical across loads.
    again = load_data(Cfg(), seed=123)
    assert torch.equal(again.train.x, digits.train.x) and torch.equal(again.test.y, digits.test.y)
    # Normalisation constants come from this train split, so it normalises to ~N(0, 1).
    ((x, _),) = Batches(digits.train, digits, 2000, shuffle=False, seed=0).epoch(0)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3


def test_digits_are_sklearns_images_and_split(digits: DataBundle) -> None:
    """data=digits reads sklearn's file itself (no sklearn import) and splits it itself: the
    result must be exactly load_digits() + train_test_split(stratify, random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target,
                              random_state=0)  # fmt: skip
    tr, te = np.sort(tr), np.sort(te)
    assert torch.equal(digits.train.x, torch.from_numpy(x[tr]))
    assert torch.equal(digits.test.x, torch.from_numpy(x[te]))
    assert torch.equal(digits.train.y, torch.from_numpy(d.target[tr]).long())
    assert torch.equal(digits.test.y, torch.from_numpy(d.target[te]).long())


def test_synthetic_needs_no_files_and_is_fixed(tmp_path: Path) -> None:
    syn = load_data(Cfg("synthetic", root=str(tmp_path / "empty")), seed=0)
    assert (len(syn.train), len(syn.test)) == (10_000, 2_000)
    assert syn.in_shape == (3, 32, 32) and syn.num_classes == 10 and syn.augment is False
    assert set(syn.train.y.unique().tolist()) == set(range(10))
    again = load_data(Cfg("synthetic"), seed=7)
    assert torch.equal(again.train.x, syn.train.x) and torch.equal(again.test.y, syn.test.y)
    ((x, _),) = Batches(syn.train, syn, 10_000, shuffle=False, seed=0).epoch(0)
    assert abs(x.mean().item()) < 1e-2 and abs(x.std().item() - 1) < 1e-2


# ----------------------------------------------------------------------------- IDX datasets


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@needs_mnist
def test_mnist_reads_in_place(mnist: DataBundle) -> None:
    before = _snapshot(DATA / "MNIST")
    b = load_data(Cfg("mnist", subset=10), seed=0)  # a fresh read, watched for writes
    assert _snapshot(DATA / "MNIST") == before, "loading must not write into the data root"
    assert torch.equal(b.train.x, mnist.train.x[:10])

    assert (len(mnist.train), len(mnist.test)) == (60000, 10000)
    assert mnist.in_shape == (1, 28, 28) and mnist.num_classes == 10 and not mnist.augment
    assert torch.bincount(mnist.train.y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.test.y).tolist() == MNIST_TEST_COUNTS
    x, _ = next(Batches(mnist.train, mnist, 20000, shuffle=True, seed=0).epoch(0))
    assert x.dtype == torch.float32 and x.shape == (20000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02


@needs_fashion
def test_fashion_mnist_reads_in_place() -> None:
    b = load_data(Cfg("fashion_mnist"), seed=0)
    assert (len(b.train), len(b.test)) == (60000, 10000)
    assert torch.bincount(b.train.y).tolist() == [6000] * 10
    assert torch.bincount(b.test.y).tolist() == [1000] * 10
    x, _ = next(Batches(b.train, b, 20000, shuffle=True, seed=0).epoch(0))
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_root_names_the_path(tmp_path: Path, name: str) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_data(Cfg(name, root=str(root)), seed=0)
    msg = str(e.value)
    assert str(root) in msg and "data.root" in msg and "download" in msg and "\n" not in msg
    assert not root.exists(), "a failed load must not create the root"


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading:\n<urlopen error Name or service not known>")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError, match="downloading it failed") as e:
        load_data(Cfg("mnist", root=str(tmp_path), download=True), seed=0)
    assert str(tmp_path / "MNIST" / "raw") in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- damaged files
# Small copies built in tmp_path, pointed at by data.root: each damage is one DataError line
# that names the file, never a traceback from numpy/gzip/torch or a silently wrong dataset.


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = (0x0800 | arr.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _fake_idx_root(root: Path, folder: str = "MNIST", n: int = 12, **replace_bytes: bytes) -> Path:
    """<root>/<folder>/raw/ with four small gzipped IDX files (n train, n // 2 test); a
    keyword (train_labels=..., t10k_images=...) replaces that file's gzip-compressed bytes."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n // 2, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n // 2) % 10,
    }
    for stem, arr in arrays.items():
        content = replace_bytes.get(stem.rsplit("-", 2)[0].replace("-", "_"), _idx_bytes(arr))
        (raw / f"{stem}.gz").write_bytes(gzip.compress(content))
    return raw


def _one_line_naming(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


def test_small_idx_copy_loads(tmp_path: Path) -> None:
    """The helper's files are sound: the damaged variants below differ in one thing each."""
    _fake_idx_root(tmp_path)
    b = load_data(Cfg("mnist", root=str(tmp_path)), seed=0)
    assert (len(b.train), len(b.test)) == (12, 6) and b.in_shape == (1, 28, 28)
    assert b.train.y.tolist() == [i % 10 for i in range(12)]


@pytest.mark.parametrize("folder,name", [("MNIST", "mnist"), ("FashionMNIST", "fashion_mnist")])
def test_idx_label_out_of_range_names_the_file(tmp_path: Path, folder: str, name: str) -> None:
    labels = np.array([0, 1, 2, 3, 10, 5, 6, 7, 8, 9, 255, 1])
    raw = _fake_idx_root(tmp_path, folder, train_labels=_idx_bytes(labels))
    with pytest.raises(DataError) as e:
        load_data(Cfg(name, root=str(tmp_path)), seed=0)
    msg = _one_line_naming(e, raw / "train-labels-idx1-ubyte.gz")
    assert "0..9" in msg and "10" in msg


@pytest.mark.parametrize(
    "stem,content,words",
    [
        pytest.param("t10k_labels", b"", "not a uint8 IDX file", id="empty"),
        pytest.param("t10k_labels", b"\x00\x00\x08\xff" + b"\x00" * 8, "header",
                     id="255-dims-no-room"),
        pytest.param("train_images", _idx_bytes(np.zeros((12, 28, 28)))[:-100], "truncated",
                     id="truncated"),
        pytest.param("train_images", _idx_bytes(np.zeros((12, 28, 28))) + b"\x00", "extra",
                     id="trailing-bytes"),
        pytest.param("train_images", _idx_bytes(np.zeros(12)), "28x28", id="labels-as-images"),
        pytest.param("train_images", _idx_bytes(np.zeros((12, 27, 28))), "28x28",
                     id="27x28-images"),
        pytest.param("t10k_images", _idx_bytes(np.zeros((0, 28, 28))), "no images", id="empty"),
        pytest.param("t10k_labels", _idx_bytes(np.zeros((6, 2))), "1-D", id="2-D-labels"),
        pytest.param("t10k_labels", _idx_bytes(np.zeros(5)), "6 images", id="counts-differ"),
        pytest.param("train_images", b"\x00\x00\x0d\x03" + b"\x00" * 12,
                     "not a uint8 IDX file", id="float-idx"),
    ],
)  # fmt: skip
def test_damaged_idx_file_names_the_file(
    tmp_path: Path, stem: str, content: bytes, words: str
) -> None:
    raw = _fake_idx_root(tmp_path, **{stem: content})
    with pytest.raises(DataError) as e:
        load_data(Cfg("mnist", root=str(tmp_path)), seed=0)
    file = raw / f"{stem.replace('_', '-')}-idx{3 if 'images' in stem else 1}-ubyte.gz"
    assert words in _one_line_naming(e, file)


@pytest.mark.parametrize("damage", ["truncated", "crc", "not_gzip"])
def test_damaged_gzip_names_the_file(tmp_path: Path, damage: str) -> None:
    raw = _fake_idx_root(tmp_path)
    path = raw / "train-labels-idx1-ubyte.gz"
    blob = bytearray(path.read_bytes())
    if damage == "truncated":
        blob = blob[: len(blob) // 2]
    elif damage == "crc":
        blob[-8] ^= 0xFF
    else:
        blob = bytearray(_idx_bytes(np.arange(12) % 10))  # plain IDX under a .gz name
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError) as e:
        load_data(Cfg("mnist", root=str(tmp_path)), seed=0)
    _one_line_naming(e, path)


def _fake_subset(root: Path, **arrays: object) -> Path:
    """<root>/CIFAR10/cifar10_subset.npz with 8 train / 4 test images; keywords replace or
    (None) drop an array."""
    path = root / "CIFAR10" / "cifar10_subset.npz"
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    z = {
        "x_train": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        "y_train": (np.arange(8) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "y_test": (np.arange(4) % 10).astype(np.uint8),
    }
    z.update(arrays)
    np.savez(path, **{k: v for k, v in z.items() if v is not None})
    return path


def test_small_cifar_subset_copy_loads(tmp_path: Path) -> None:
    _fake_subset(tmp_path)
    b = load_data(Cfg("cifar10", root=str(tmp_path)), seed=0)
    assert (len(b.train), len(b.test)) == (8, 4) and b.in_shape == (3, 32, 32)


@pytest.mark.parametrize(
    "arrays,words",
    [
        ({"y_test": np.array([0, 1, 10, 3], np.uint8)}, "0..9"),
        ({"y_train": np.array([0, 1, 2, 3, 4, 5, 6, -1])}, "0..9"),
        ({"y_train": None}, "y_train"),  # missing array
        ({"x_test": np.zeros((4, 32, 32), np.uint8)}, "x_test"),  # wrong shape
        ({"x_train": np.zeros((8, 3, 32, 32), np.uint8)}, "x_train"),  # CHW, not HWC
        ({"y_train": np.zeros(7, np.uint8)}, "y_train"),  # count differs from x_train
        ({"y_test": np.array(["a", "b", "c", "d"], dtype=object)}, "y_test"),  # pickled
        ({"x_train": np.zeros((8, 32, 32, 3), np.float32)}, "x_train"),  # not uint8
        ({"y_test": np.zeros(4, np.float32)}, "y_test"),  # not integers
        (
            {"x_test": np.zeros((0, 32, 32, 3), np.uint8), "y_test": np.zeros(0, np.uint8)},
            "no images",
        ),
    ],
)
def test_damaged_cifar_subset_names_the_file(tmp_path: Path, arrays: dict, words: str) -> None:
    path = _fake_subset(tmp_path, **arrays)
    with pytest.raises(DataError) as e:
        load_data(Cfg("cifar10", root=str(tmp_path)), seed=0)
    assert words in _one_line_naming(e, path)


@pytest.mark.parametrize(
    "content", [b"", b"not a zip archive at all", b"PK\x03\x04broken"], ids=["empty", "text", "zip"]
)
def test_garbage_npz_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "CIFAR10" / "cifar10_subset.npz"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_data(Cfg("cifar10", root=str(tmp_path)), seed=0)
    _one_line_naming(e, path)


def test_npy_under_the_npz_name_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "CIFAR10" / "cifar10_subset.npz"
    path.parent.mkdir()
    with open(path, "wb") as f:
        np.save(f, np.zeros((8, 32, 32, 3), np.uint8))
    with pytest.raises(DataError) as e:
        load_data(Cfg("cifar10", root=str(tmp_path)), seed=0)
    _one_line_naming(e, path)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])  # fmt: skip
def test_damaged_cifar_folder_names_it(tmp_path: Path, name: str, folder: str) -> None:
    """torchvision checks the archive's md5s before it unpickles anything: a damaged (or
    crafted) batch file is refused, in one line naming the folder."""
    full = tmp_path / folder
    full.mkdir()
    for f in ("data_batch_1", "test_batch", "train", "test", "batches.meta", "meta"):
        (full / f).write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        load_data(Cfg(name, root=str(tmp_path)), seed=0)
    _one_line_naming(e, full)
