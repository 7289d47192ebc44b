"""Files from elsewhere are data: a saved run config (an export's MODEL.pt.json, a
checkpoint's meta.json, a run's summary.json) never chooses code to import or call.

Each payload is real: were the config honoured, it would run and leave a marker file. A
module that writes the marker when imported; `torch.hub.load` of a hubconf.py lying beside
the model; and a standard-library callable (`logging.basicConfig`, which opens the file it
is given) needing no extra file at all. Every command that builds a network from a file
(eval, generate, export of a checkpoint; export of a run carries the config on, and eval
then refuses it) must refuse before anything is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sidpipe import export, inference
from sidpipe.config import compose_config, to_dict
from sidpipe.errors import SidpipeError
from sidpipe.saved import check_saved, load_exported
from tests.conftest import REPO, train_in_process
from tests.test_export import make_model

MODULE = "sidpipe_payload_module"


def payloads(where: Path) -> list[SimpleNamespace]:
    """(target, kwargs, marker) of each payload; the files they need are laid in `where`."""
    out = []
    marker = where / "ran-module"
    (where / f"{MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\ndef make_layers(**kwargs):\n    return []\n"
    )
    out.append(SimpleNamespace(target=f"{MODULE}:make_layers", kwargs={}, marker=marker))
    hub = where / "hub"
    hub.mkdir()
    marker = where / "ran-hub"
    (hub / "hubconf.py").write_text(
        f"open({str(marker)!r}, 'w').write('hub')\ndef x(**kwargs):\n    return []\n"
    )
    out.append(SimpleNamespace(
        target="torch.hub:load", marker=marker,
        kwargs={"repo_or_dir": str(hub), "model": "x", "source": "local", "trust_repo": True},
    ))  # fmt: skip
    marker = where / "ran-logging"
    out.append(SimpleNamespace(target="logging:basicConfig", marker=marker,
                               kwargs={"filename": str(marker), "force": True}))  # fmt: skip
    return out


def poisoned(config: dict, payload: SimpleNamespace) -> dict:
    """A saved run config edited to build its network with the payload."""
    model = {**config["model"], "name": "custom", "target": payload.target,
             "kwargs": payload.kwargs, "width": None}  # fmt: skip
    return {**config, "model": model}


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """An exported digits mlp and the payloads, importable as a downloaded module would be."""
    monkeypatch.syspath_prepend(str(tmp_path))
    model = make_model(tmp_path / "m", ["data=digits"])
    yield SimpleNamespace(model=model, payloads=payloads(tmp_path), root=tmp_path)
    sys.modules.pop(MODULE, None)


def poison_sidecar(model: Path, payload: SimpleNamespace) -> Path:
    side = model.with_name(model.name + ".json")
    saved = json.loads(side.read_text())
    side.write_text(json.dumps({"config": poisoned(saved["config"], payload)}))
    return model


def assert_refused(e: pytest.ExceptionInfo, payload: SimpleNamespace) -> None:
    msg = str(e.value)
    assert "\n" not in msg and "never run" in msg and payload.target in msg, msg
    assert f"--trust-target={payload.target}" in msg, msg
    assert not payload.marker.exists(), f"the payload {payload.target} ran"
    assert MODULE not in sys.modules


def test_eval_and_generate_refuse_a_sidecar_that_names_code(lab: SimpleNamespace) -> None:
    for payload in lab.payloads:
        model = poison_sidecar(lab.model, payload)
        with pytest.raises(SidpipeError) as e:
            inference.evaluate_model(model, [])
        assert_refused(e, payload)
        with pytest.raises(SidpipeError) as e:
            inference.generate_text(model, "", 5, None, None, 1.0, 0)
        assert_refused(e, payload)
        with pytest.raises(SidpipeError) as e:  # naming another target is no trust in this one
            inference.evaluate_model(model, [], trust="os:getcwd")
        assert_refused(e, payload)


def test_export_of_a_run_carries_the_config_and_eval_still_refuses(lab: SimpleNamespace) -> None:
    run = lab.model.parent / "run"
    summary = json.loads((run / "summary.json").read_text())
    for i, payload in enumerate(lab.payloads):
        (run / "summary.json").write_text(
            json.dumps({"config": poisoned(summary["config"], payload)})
        )
        out = export.export_model(run, lab.root / f"re{i}.pt")  # builds nothing: copies
        with pytest.raises(SidpipeError) as e:
            inference.evaluate_model(out, [])
        assert_refused(e, payload)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ckpt-run")
    train_in_process(["data=digits", "model.width=16", "progress=false", "train.max_steps=2",
                      "checkpoint.every_n_steps=2"], run)  # fmt: skip
    return next((run / "checkpoints").glob("step_*"))


def test_export_of_a_checkpoint_refuses_an_edited_meta_json(
    lab: SimpleNamespace, checkpoint_dir: Path, tmp_path: Path
) -> None:
    """meta.json is not covered by its own checksums: editing it needs no re-signing, so
    its config must never choose code."""
    import shutil

    ckpt = tmp_path / "ckpt" / checkpoint_dir.name
    shutil.copytree(checkpoint_dir, ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    for payload in lab.payloads:
        edited = {**meta, "config": poisoned(meta["config"], payload)}
        (ckpt / "meta.json").write_text(json.dumps(edited))
        with pytest.raises(SidpipeError) as e:
            export.export_model(ckpt, tmp_path / "out.pt")
        assert_refused(e, payload)
        assert not (tmp_path / "out.pt").exists()


def test_the_user_can_trust_a_target_by_naming_it(lab: SimpleNamespace) -> None:
    """The gate is what stops the payload: naming the same target (the trust flag, or eval's
    own model.target override) lets it run, as the user asked."""
    payload = lab.payloads[0]
    model = poison_sidecar(lab.model, payload)
    with pytest.raises(SidpipeError, match="must return a non-empty list"):
        inference.evaluate_model(model, [], trust=payload.target)
    assert payload.marker.exists()
    payload.marker.unlink()
    sys.modules.pop(MODULE, None)
    with pytest.raises(SidpipeError, match="must return a non-empty list"):
        inference.evaluate_model(model, [f"model.target={payload.target}"])
    assert payload.marker.exists()


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda c: {**c, "hydra": {"searchpath": ["file:///tmp"]}}, "hydra"),
        (lambda c: {**c, "defaults": ["_self_"]}, "defaults"),
        (lambda c: {**c, "model": {**c["model"], "_target_": "os.system"}}, "_target_"),
        (lambda c: {**c, "seed": "${oc.env:HOME}"}, "seed"),
        (lambda c: {**c, "train": {**c["train"], "epochs": "many"}}, "epochs"),
        (lambda c: [1, 2], "mapping"),
    ],
    ids=["hydra", "defaults", "instantiate", "interpolation", "bad-type", "not-a-mapping"],
)
def test_a_saved_config_is_parsed_against_the_schema(lab: SimpleNamespace, edit, words) -> None:
    side = lab.model.with_name(lab.model.name + ".json")
    saved = json.loads(side.read_text())["config"]
    side.write_text(json.dumps({"config": edit(saved)}))
    with pytest.raises(SidpipeError) as e:
        inference.evaluate_model(lab.model, [])
    msg = str(e.value)
    assert "\n" not in msg and str(side) in msg and words in msg, msg


def test_a_saved_string_stays_literal(lab: SimpleNamespace) -> None:
    """No interpolation is resolved from a file: `${oc.env:...}` in a string field is text."""
    side = lab.model.with_name(lab.model.name + ".json")
    saved = json.loads(side.read_text())["config"]
    saved["data"]["root"] = "${oc.env:HOME}"
    side.write_text(json.dumps({"config": saved}))
    cfg, _, _ = load_exported(lab.model, [], data=False)
    assert cfg.data.root == "${oc.env:HOME}"


@pytest.mark.multiprocess
def test_cli_refuses_every_command_in_one_line(lab: SimpleNamespace) -> None:
    payload = lab.payloads[0]
    model = poison_sidecar(lab.model, payload)
    env = {"PYTHONPATH": f"{lab.root}:{REPO}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    for argv in (["eval", str(model)], ["generate", str(model)]):
        r = subprocess.run([sys.executable, "-m", "sidpipe.cli", *argv], capture_output=True,
                           text=True, timeout=120, cwd=REPO, env=env)  # fmt: skip
        assert r.returncode == 1 and r.stdout == "", r.stderr[-2000:]
        assert r.stderr.startswith("sidpipe: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "never run" in r.stderr
    assert not payload.marker.exists()


def test_saved_config_of_a_real_run_passes_the_schema(tmp_path: Path) -> None:
    """The check refuses files, not runs: every zoo model's saved config is accepted."""
    for model in ("mlp", "simplecnn", "resnet18", "vgg11", "vit_tiny"):
        cfg = to_dict(compose_config([f"model={model}", "data=cifar10"]))
        assert check_saved(cfg, tmp_path / "x.json") is cfg
