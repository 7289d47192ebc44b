"""`sidpipe export` / `sidpipe eval`: overrides composed as `train` composes them, on top of
the run config saved beside the model; every bad model file, sidecar or model/data mismatch
is one line naming it, caught before any weight is loaded, and no file ever runs code.

In process: the "runs" are built here (a network's initial state_dict saved as a finished
run's model/stage0.pt plus summary.json) and the MNIST-format datasets are tiny IDX copies
in tmp_path, so no training and no real dataset is needed. One test runs the real CLI.
"""

from __future__ import annotations

import gzip
import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sidpipe import export, inference, saved
from sidpipe.config import compose_config, to_dict
from sidpipe.data import DATASET_SHAPES
from sidpipe.errors import SidpipeError
from sidpipe.models import build_net
from sidpipe.runtime.io import save_state
from tests.conftest import REPO

# a misspelt key: one line naming it and the nearest valid key
TYPO_LINE = "unknown key 'train.batch_sise' (did you mean 'train.batch_size'?)"
SMALL = ["model.width=16", "model.depth=2", "model.head_hidden=0", "train.eval_batch_size=7"]


def _idx(arr: np.ndarray) -> bytes:
    header = (0x0800 | arr.ndim).to_bytes(4, "big")
    return header + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


def fake_idx_root(root: Path, folder: str, n: int = 20, seed: int = 0) -> Path:
    """<root>/<folder>/raw/: the four gzipped IDX files of a 28x28, 10-class dataset."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", n), ("t10k", n)):
        x = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        y = (np.arange(count) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(x)))
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(y)))
    return root


def make_model(where: Path, overrides: list[str]) -> Path:
    """Export a "finished run" of the network these train overrides build (its initial
    parameters: a trained one has the same names and shapes)."""
    cfg = compose_config([*SMALL, "pipeline.stages=1", *overrides])  # one stage file
    in_shape, classes = DATASET_SHAPES[cfg.data.name]
    net = build_net(cfg, SimpleNamespace(in_shape=in_shape, num_classes=classes))  # type: ignore[arg-type]
    run = where / "run"
    save_state(net.state_dict(), run, 0)
    (run / "summary.json").write_text(json.dumps({"config": to_dict(cfg)}))
    return export.export_model(run, where / "model.pt")


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("data")
    return SimpleNamespace(
        mnist=fake_idx_root(base / "m", "MNIST", seed=1),
        fashion=fake_idx_root(base / "f", "FashionMNIST", seed=2),
    )


@pytest.fixture(scope="module")
def fashion_model(tmp_path_factory: pytest.TempPathFactory, roots: SimpleNamespace) -> Path:
    """An mlp exported from a fashion_mnist run whose data.root was roots.fashion."""
    return make_model(tmp_path_factory.mktemp("fm"), ["data=fashion_mnist",
                                                       f"data.root={roots.fashion}"])  # fmt: skip


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("dg"), ["data=digits"])


@pytest.fixture
def no_weight_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mismatch must be found before load_state_dict (whose error is many lines)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_state_dict was called: the mismatch was not caught first")

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", refuse)


def one_line(e: pytest.ExceptionInfo, *names: object) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, msg
    return msg


# ----------------------------------------------------------------------------- overrides


def test_eval_on_the_saved_config(fashion_model: Path) -> None:
    """No overrides: the saved run config (its model.width=16, data, data.root) as it was."""
    got = inference.evaluate_model(fashion_model, [])
    assert got["data"] == "fashion_mnist" and len(got["per_depth_accuracy"]) == 2
    assert got["test_accuracy"] == got["per_depth_accuracy"][-1]


def test_eval_takes_group_overrides_as_train_does(
    fashion_model: Path, roots: SimpleNamespace
) -> None:
    """`data=mnist data.root=DIR` (a group override, as `sidpipe train` takes it) evaluates on
    MNIST, exactly as the key form does; other groups (optim=sgd) compose too."""
    by_group = inference.evaluate_model(fashion_model, ["data=mnist", f"data.root={roots.mnist}"])
    by_key = inference.evaluate_model(fashion_model, ["data.name=mnist",
                                                   f"data.root={roots.mnist}"])  # fmt: skip
    assert by_group["data"] == by_key["data"] == "mnist"
    assert by_group["per_depth_accuracy"] == by_key["per_depth_accuracy"]
    saved = inference.evaluate_model(fashion_model, ["optim=sgd", "train.eval_batch_size=3"])
    assert saved["data"] == "fashion_mnist"


def test_overrides_compose_on_top_of_the_saved_config(fashion_model: Path, roots) -> None:
    raw = json.loads(fashion_model.with_name("model.pt.json").read_text())["config"]
    cfg = saved.compose_saved(raw, ["data=mnist", "optim=sgd", "train.eval_batch_size=3"])
    assert cfg.data.name == "mnist" and cfg.data.root == str(roots.fashion)  # kept from the run
    assert cfg.model.width == 16 and cfg.model.head_hidden == 0  # the run's, not the defaults
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.05  # conf/optim/sgd.yaml
    assert cfg.train.eval_batch_size == 3
    # a saved string that looks like an interpolation stays a plain string
    raw["data"]["root"] = "/data/${oops}"
    assert saved.compose_saved(raw, []).data.root == "/data/${oops}"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data=imagenet"], "unknown option 'data=imagenet' (choose one of cifar10,"),
        (["optim.lr=inf"], "optim.lr must be a finite number > 0"),
        (["train.batch_sise=4"], TYPO_LINE),
        (["model.widht=3"], "unknown key 'model.widht' (did you mean 'model.width'?)"),
        (["data.root"], "data.root"),  # hydra's own syntax error
    ],
)
def test_bad_overrides_are_one_line(digits_model: Path, overrides, message) -> None:
    with pytest.raises(SidpipeError) as e:
        inference.evaluate_model(digits_model, overrides)
    one_line(e, message)


# ----------------------------------------------------------------------------- mismatches


@pytest.mark.parametrize(
    "overrides,names",
    [
        (["data=mnist"], ["data=digits", "(1, 8, 8)", "data=mnist", "(1, 28, 28)"]),
        (["data.name=cifar10"], ["(1, 8, 8)", "(3, 32, 32)"]),
    ],
)
def test_model_data_mismatch_named_before_loading(
    digits_model: Path, overrides, names, no_weight_loading
) -> None:
    """Found from the dataset names alone: even an absent data.root is not reached."""
    with pytest.raises(SidpipeError) as e:
        inference.evaluate_model(digits_model, [*overrides, "data.root=/nonexistent/sidpipe"])
    one_line(e, digits_model, *names)


def test_class_count_mismatch(tmp_path: Path, no_weight_loading) -> None:
    model = make_model(tmp_path, ["data=synthetic"])
    with pytest.raises(SidpipeError) as e:
        inference.evaluate_model(model, ["data=cifar100"])
    one_line(e, model, "10 classes", "100 classes")


@pytest.mark.parametrize(
    "overrides,names",
    [
        (["model.width=32"], ["blocks.0", "[16, 64]", "[32, 64]"]),
        (["model.depth=3"], ["blocks.2", "lacks"]),
        (["model.head_hidden=8"], ["heads.0", "lacks"]),
        (["model=simplecnn"], ["model=simplecnn", "lacks"]),
        (["sid.variant=shared", "pipeline.stages=1"], ["lacks"]),
    ],
)
def test_model_mismatch_names_the_parameters(
    digits_model: Path, overrides, names, no_weight_loading
) -> None:
    with pytest.raises(SidpipeError) as e:
        inference.evaluate_model(digits_model, overrides)
    one_line(e, digits_model, *names)


# ----------------------------------------------------------------------------- bad files


class Payload:
    """Unpickling this runs code: it must be refused, never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def sidecar_for(model: Path, digits_model: Path) -> None:
    side = digits_model.with_name(digits_model.name + ".json")
    model.with_name(model.name + ".json").write_text(side.read_text())


@pytest.mark.parametrize(
    "how,words",
    [
        ("torch.save", "refused: it names the Python object exec"),
        ("pickle-2", "refused: it names the Python object exec"),  # legacy torch format
        ("pickle-5", "Unsupported operand"),  # refused at its first protocol-4+ opcode
    ],
)
def test_unsafe_pickle_is_refused_and_never_runs(
    tmp_path: Path, digits_model: Path, how: str, words: str
) -> None:
    marker = tmp_path / "ran"
    model = tmp_path / "evil.pt"
    state = {"x": Payload(marker)}
    if how == "torch.save":
        torch.save(state, model)
    else:
        model.write_bytes(pickle.dumps(state, protocol=int(how[-1])))
    sidecar_for(model, digits_model)
    with pytest.raises(SidpipeError) as e:
        inference.evaluate_model(model, [])
    one_line(e, model, words)
    assert not marker.exists(), "the payload ran"
    assert "weights_only=False" not in str(e.value)  # torch's advice to run it is not ours


@pytest.mark.parametrize(
    "content,words",
    [
        (b"", "cannot load"),
        (b"\x80\x04garbage", "cannot load"),
        (b"PK\x03\x04" + bytes(100), "cannot load"),
        ([1, 2, 3], "not a state_dict"),
        ({"w": 1.0}, "not a state_dict"),
        (torch.zeros(3), "not a state_dict"),
        ({}, "not a state_dict"),
    ],
    ids=["empty", "garbage", "bad-zip", "list", "float-value", "tensor", "empty-dict"],
)
def test_not_a_state_dict_is_one_line(tmp_path: Path, digits_model: Path, content, words) -> None:
    model = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        model.write_bytes(content)
    else:
        torch.save(content, model)
    sidecar_for(model, digits_model)
    with pytest.raises(SidpipeError) as e:
        inference.evaluate_model(model, [])
    one_line(e, model, words)


def test_missing_model_file_and_sidecar(tmp_path: Path, digits_model: Path) -> None:
    with pytest.raises(SidpipeError) as e:
        inference.evaluate_model(tmp_path / "none.pt", [])
    one_line(e, tmp_path / "none.pt", "not found")
    with pytest.raises(SidpipeError) as e:
        inference.evaluate_model(tmp_path, [])  # a directory
    one_line(e, tmp_path, "not a file")
    model = tmp_path / "m.pt"
    model.write_bytes(digits_model.read_bytes())
    with pytest.raises(SidpipeError) as e:
        inference.evaluate_model(model, [])
    one_line(e, tmp_path / "m.pt.json", "not found")


@pytest.mark.parametrize(
    "text", ["", "{not json", "[1, 2]", '{"cfg": {}}', '{"config": 3}', '{"config": {"x": 1}}']
)
def test_bad_sidecar_is_one_line(tmp_path: Path, digits_model: Path, text: str) -> None:
    model = tmp_path / "m.pt"
    model.write_bytes(digits_model.read_bytes())
    model.with_name("m.pt.json").write_text(text)
    with pytest.raises(SidpipeError) as e:
        inference.evaluate_model(model, [])
    one_line(e, tmp_path / "m.pt.json")


# ----------------------------------------------------------------------------- export


def test_export_bad_sources_are_one_line(tmp_path: Path, digits_model: Path) -> None:
    with pytest.raises(SidpipeError) as e:
        export.export_model(tmp_path / "nowhere", tmp_path / "o.pt")
    one_line(e, tmp_path / "nowhere")
    run = digits_model.parent / "run"
    broken = tmp_path / "run"
    (broken / "model").mkdir(parents=True)
    (broken / "summary.json").write_text((run / "summary.json").read_text())
    (broken / "model" / "stage0.pt").write_bytes(b"damaged")
    with pytest.raises(SidpipeError) as e:
        export.export_model(broken, tmp_path / "o.pt")
    one_line(e, broken / "model" / "stage0.pt")
    (broken / "model" / "stage0.pt").write_bytes((run / "model" / "stage0.pt").read_bytes())
    (broken / "summary.json").write_text("{")
    with pytest.raises(SidpipeError) as e:
        export.export_model(broken, tmp_path / "o.pt")
    one_line(e, broken / "summary.json")
    (tmp_path / "file").write_text("")
    with pytest.raises(SidpipeError) as e:  # OUT under a file: cannot be written
        export.export_model(run, tmp_path / "file" / "o.pt")
    one_line(e, tmp_path / "file" / "o.pt")


def test_main_prints_one_error_line(
    tmp_path: Path, digits_model: Path, capsys: pytest.CaptureFixture
) -> None:
    """The entry point: `sidpipe: error: ...`, one line, exit 1, nothing on stdout."""
    for argv in ([str(tmp_path / "none.pt")], [str(digits_model), "data=mnist"]):
        with pytest.raises(SystemExit) as e:
            inference.main("eval", argv)
        assert e.value.code == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("sidpipe: error: ") and err.count("\n") == 1, err


@pytest.mark.multiprocess
def test_cli_eval_refuses_in_one_line(tmp_path: Path, digits_model: Path) -> None:
    marker = tmp_path / "ran"
    model = tmp_path / "evil.pt"
    torch.save({"x": Payload(marker)}, model)
    sidecar_for(model, digits_model)
    for argv, words in (([str(model)], "exec"), ([str(digits_model), "data=mnist"], "(1, 8, 8)")):
        r = subprocess.run([sys.executable, "-m", "sidpipe.cli", "eval", *argv],
                           capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
        assert r.returncode == 1 and r.stdout == "", r.stderr[-2000:]
        assert r.stderr.startswith("sidpipe: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert words in r.stderr
    assert not marker.exists()


def test_eval_misspelt_key_is_one_line(digits_model: Path, capsys: pytest.CaptureFixture) -> None:
    """`sidpipe eval` as the command line reaches it: the same line as train's for a typo."""
    from sidpipe.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(digits_model), "model.widht=3"])
    out, err = capsys.readouterr()
    assert exit_.value.code != 0 and out == ""
    assert err.strip().splitlines() == [
        "sidpipe: error: unknown key 'model.widht' (did you mean 'model.width'?)"
    ]
