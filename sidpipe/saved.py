"""What a run saved, read back as untrusted data: the run config an export carries
(`MODEL.pt.json`) or a checkpoint's `meta.json`, the model file, and the network built
from them (shared by `sidpipe export`, `eval` and `generate`).

A saved config is parsed against the schema (no hydra section, no interpolation, no
instantiation) and never chooses code: a `model=custom` target is built only when the user
names it (`check_trusted`). Overrides compose on it exactly as `sidpipe train` composes
them on conf/config.yaml (hydra: group choices such as `data=mnist`, keys such as
`data.root=DIR`). Before any weight is loaded: the file is a plain state_dict (read
weights-only: no file runs code), the data has the input shape and classes the model was
exported for, and the rebuilt network has exactly the file's parameter names and shapes;
each failure is one line naming the file and both sides.
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sidpipe.config import (
    CONF_DIR,
    LANGUAGE_MODELS,
    TEXT_DATASETS,
    Config,
    Method,
    Variant,
    compose_config,
    text_vocab,
)
from sidpipe.data import DATASET_SHAPES, DataBundle, load_data
from sidpipe.errors import CheckpointError, ConfigError
from sidpipe.models import BlockNet, build_net

TRUST_HELP = ("build a model=custom model from the file only if its model.target is TARGET "
              "(code named by a file is never run otherwise)")  # fmt: skip

# ----------------------------------------------------------------------------- config


def _escape(value: Any) -> Any:
    """Saved strings are values, not interpolations: `${...}` in one stays literal."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


_SAVED = "saved_run"  # the group option that keeps the saved section


def compose_saved(raw: dict[str, Any], overrides: list[str]) -> Config:
    """The config `sidpipe train OVERRIDES` would run with if conf/config.yaml were the saved
    run config `raw`: a group choice (`data=mnist`) loads conf/data/mnist.yaml on top of the
    saved data section (the section's other keys, data.root too, stay the run's), a key
    (`data.root=DIR`) sets that key, `+experiment=...` applies an experiment. Checked like
    train's config; hydra's and the schema's errors are one line."""
    # the config groups of conf/config.yaml's defaults list (experiment: optional, below)
    groups = sorted(p.name for p in Path(CONF_DIR).iterdir()
                    if p.is_dir() and p.name != "experiment")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sidpipe-eval-") as tmp:
        # the saved config is the primary config; an empty option `saved_run` of each group
        # keeps the saved section as it is, unless an override chooses another option
        primary = {
            "defaults": ["base_config", "_self_", *({g: _SAVED} for g in groups),
                         {"optional experiment": None}],
            "hydra": {"searchpath": [f"file://{CONF_DIR}"]},
            **_escape(raw),
        }  # fmt: skip
        for g in groups:
            (Path(tmp) / g).mkdir()
            (Path(tmp) / g / f"{_SAVED}.yaml").write_text("{}\n")
        OmegaConf.save(OmegaConf.create(primary), Path(tmp) / "run_config.yaml")
        try:
            return compose_config(overrides, config_dir=tmp, config_name="run_config")
        except ConfigError as e:  # `saved_run` is not an option users choose
            raise ConfigError(re.sub(rf"\b{_SAVED}, |, {_SAVED}\b", "", str(e))) from None


def check_saved(raw: Any, side: Path) -> dict[str, Any]:
    """A run config read from a file is data, checked against the schema before use: every
    key must be one of the schema's (a `hydra` or `defaults` section, which would configure
    hydra itself, is refused like any unknown key) with a value of its type; strings stay
    literal (no `${...}` interpolation is resolved from a file)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{side}: the saved run config is not a mapping")
    try:  # to_object: every value converted to its field's type, every check run
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), _escape(raw)))
    except Exception as e:  # noqa: BLE001 - OmegaConf's key and type errors: one line
        what = " ".join(str(e).split("\n")[0].split())
        key = getattr(e, "full_key", None)
        where = f"{key}: " if key and key not in what else ""
        raise CheckpointError(f"{side}: the saved run config is refused ({where}{what})") from None
    return raw


def check_data_kind(saved: dict[str, Any], overrides: list[str], side: Path) -> None:
    """`data=NAME` of the other kind (text for a classifier, images for a language model) is
    named as such, before composing: the saved data section's keys (data.path of a text
    set) would otherwise be blamed on a data set the user never configured."""
    model = (saved.get("model") or {}).get("name")
    lm = model in LANGUAGE_MODELS
    for o in overrides:
        key, sep, name = o.lstrip("+").partition("=")
        if sep and key == "data" and (name in TEXT_DATASETS) != lm:
            model_path = side.with_suffix("")
            raise ConfigError(
                f"{model_path} is a model={model} "
                + (
                    "language model: it reads text (data=shakespeare or data=text), "
                    if lm
                    else "classifier: it reads images, "
                )  # fmt: skip
                + f"not data={name}"
            )


def check_trusted(saved: dict[str, Any], trusted: str | None, side: Path) -> None:
    """Nothing read from a file may choose code to import or call. A saved `model=custom`
    names a callable (`model.target`) that building the network would import and call with
    arguments from the file; it is built only when the user names the same target (eval:
    the override `model.target=...`; every command: `--trust-target=...`). Runs before
    anything is imported."""
    model = saved.get("model")
    target = model.get("target") if isinstance(model, dict) else None
    custom = isinstance(model, dict) and model.get("name") == "custom"
    if target is None and not custom:
        return
    if trusted is not None and trusted == target:
        return
    raise CheckpointError(
        f"{side} names code to run (model=custom model.target={target!r}); it was not "
        "imported: code named by a file from elsewhere is never run. If you trust it, name "
        f"it yourself: --trust-target={target}" + (f" (you named {trusted!r})" if trusted else "")
    )


def trusted_target(overrides: list[str], trust: str | None) -> str | None:
    """The custom-model target the user named: `--trust-target`, else an override
    `model.target=...` (eval), which builds the user's own choice of code."""
    if trust is not None:
        return trust
    for o in overrides:
        key, sep, value = o.lstrip("+").partition("=")
        if sep and key == "model.target":
            return value
    return None


def compose_for_eval(
    saved: dict[str, Any], overrides: list[str], side: Path, trust: str | None = None
) -> Config:
    """compose_saved on a checked, trusted saved config; a saved config that does not
    compose is blamed on its file."""
    check_saved(saved, side)
    check_data_kind(saved, overrides, side)
    named = trusted_target(overrides, trust)
    if trust is None and named is not None:
        # named by eval's own override, which replaces the file's target: the user's code
        saved = {**saved, "model": {**saved.get("model", {}), "target": named}}
    check_trusted(saved, named, side)
    try:
        return compose_saved(saved, overrides)
    except ConfigError as e:
        if not overrides:
            raise CheckpointError(f"{side}: the saved run config is not usable ({e})") from None
        try:
            compose_saved(saved, [])
        except ConfigError as saved_error:
            raise CheckpointError(
                f"{side}: the saved run config is not usable ({saved_error})"
            ) from None
        raise  # the user's overrides are at fault


# ----------------------------------------------------------------------------- files


def first_line(e: BaseException) -> str:
    """The first sentence of an error, in one line (torch's run on with advice)."""
    text = " ".join(str(e).split())
    text = text.split(". ")[0][:200].rstrip(".")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict, read weights-only: a file that names any other Python object
    (code to run) is refused, and nothing in it runs. Every failure is one line naming it."""
    if not path.exists():
        raise CheckpointError(f"model file {path} not found")
    if not path.is_file():
        raise CheckpointError(f"model file {path} is not a file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not our line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{path} is refused: it names the Python object {found.group(1)}, which a "
                "plain state_dict never holds (it was not run: models are read weights-only)"
            ) from None
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))  # not torch's advice
        reason = found.group(1).split(". ")[0].strip().rstrip(".") if found else ""
        raise CheckpointError(
            f"cannot load {path}: not a torch-saved state_dict ({reason or 'unreadable pickle'})"
        ) from None
    except Exception as e:  # noqa: BLE001 - empty, truncated, not a torch file: "cannot load"
        raise CheckpointError(
            f"cannot load {path}: not a torch-saved state_dict ({first_line(e)})"
        ) from None
    what = None
    if not isinstance(obj, dict):
        what = f"a {type(obj).__name__}"
    elif not obj:
        what = "an empty dict"
    else:
        for k, v in obj.items():
            if not (isinstance(k, str) and isinstance(v, torch.Tensor)):
                what = f"a dict whose entry {k!r} is a {type(v).__name__}"
                break
    if what is not None:
        raise CheckpointError(
            f"{path} is not a state_dict (parameter names to tensors): it holds {what}"
        )
    return obj


def read_sidecar(model_path: Path) -> dict[str, Any]:
    """The run config `sidpipe export` wrote beside the model as MODEL.pt.json."""
    side = model_path.with_name(model_path.name + ".json")
    if not side.is_file():
        raise CheckpointError(
            f"{side} not found: `sidpipe eval` rebuilds the network from the run config that "
            "`sidpipe export` writes beside the model; export it again, or copy it along"
        )
    try:
        raw = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {side} ({first_line(e)})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise CheckpointError(f"{side} is not an export's run config (no 'config' mapping)")
    config = raw["config"]
    data = config.get("data")
    if isinstance(data, dict) and data.get("tokenizer") == "bpe":
        # the tokenizer the export carried, beside the model: the file named and hashed here
        # (the sidecar is as untrusted as the model: a plain file name, a hex digest)
        record = raw.get("tokenizer")
        name = record.get("file") if isinstance(record, dict) else None
        sha = record.get("sha256") if isinstance(record, dict) else None
        plain = isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
        if not plain or not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise CheckpointError(
                f"{side} records no usable tokenizer (a 'tokenizer' entry with a file name and "
                "sha256): export the model again"
            )
        config = {**config, "data": {**data, "tokenizer_path": str(model_path.with_name(name)),
                                     "tokenizer_sha256": sha}}  # fmt: skip
    return config


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} ({first_line(e)})") from None


# ----------------------------------------------------------------------------- checks


def _describe(cfg: Config) -> str:
    shared = cfg.sid.variant is Variant.shared
    model = "sid.variant=shared" if shared else f"model={cfg.model.name}"
    return f"{model} data={cfg.data.name}"


def check_data_fits(saved: dict[str, Any], cfg: Config, model_path: Path) -> None:
    """The data must have the input shape and the classes the model was exported for: known
    from the dataset names alone, so this runs before any data or weight is loaded."""
    data = saved.get("data")
    name = data.get("name") if isinstance(data, dict) else None
    if name not in DATASET_SHAPES or name == cfg.data.name:
        return
    (was_shape, was_k), (now_shape, now_k) = DATASET_SHAPES[name], DATASET_SHAPES[cfg.data.name]
    if (was_shape, was_k) != (now_shape, now_k):
        raise ConfigError(
            f"{model_path} was exported for data={name} (input {was_shape}, {was_k} classes) "
            f"but data={cfg.data.name} has input {now_shape}, {now_k} classes; evaluate it on "
            "data of the same input shape and classes"
        )


def bp_unused(net: torch.nn.Module, cfg: Config) -> set[str]:
    """A BP model's heads before the last: BP trains only the final head, so the BP pipeline
    saves only that one; they keep their initial values and no BP inference reads them."""
    if cfg.method is not Method.bp or not isinstance(net, BlockNet):
        return set()
    last = f"heads.{net.n_blocks - 1}."
    return {k for k in net.state_dict() if k.startswith("heads.") and not k.startswith(last)}


def check_state_fits(
    net: torch.nn.Module, state: dict[str, torch.Tensor], model_path: Path, cfg: Config
) -> None:
    """The rebuilt network must have exactly the file's parameter names and shapes."""
    unused = bp_unused(net, cfg)  # saved by single-process BP, not by the BP pipeline
    want = {k: list(v.shape) for k, v in net.state_dict().items() if k not in unused}
    have = {k: list(v.shape) for k, v in state.items() if k not in unused}
    where = f"{model_path} does not fit the network built for {_describe(cfg)}"
    hint = "; use the model.* / data.* settings of the run it was exported from"
    lacks, extra = [k for k in want if k not in have], [k for k in have if k not in want]
    if lacks or extra:

        def some(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")

        parts = ([f"the file lacks {some(lacks)}"] if lacks else []) + (
            [f"the network lacks {some(extra)}"] if extra else []
        )
        raise ConfigError(f"{where}: {' and '.join(parts)}{hint}")
    for k, shape in want.items():
        if have[k] != shape:
            raise ConfigError(
                f"{where}: parameter {k} is {have[k]} in the file but {shape} in the network{hint}"
            )


class Shapes:
    """What build_net reads from a DataBundle, from the data config alone: building a
    network for export needs no data files (text: windows of data.context bytes)."""

    def __init__(self, cfg: Config):
        if cfg.data.name in TEXT_DATASETS:
            self.in_shape, self.num_classes = (cfg.data.context,), text_vocab(cfg.data)
        else:
            self.in_shape, self.num_classes = DATASET_SHAPES[cfg.data.name]


def load_exported(
    model_path: Path, overrides: list[str], data: bool = True, trust: str | None = None
) -> tuple[Config, torch.nn.Module, DataBundle | None]:
    """The exported network, checked against its config (and the data, when loaded)."""
    state = read_state(model_path)
    saved = read_sidecar(model_path)
    side = model_path.with_name(model_path.name + ".json")
    cfg = compose_for_eval(saved, overrides, side, trust)
    check_data_fits(saved, cfg, model_path)
    bundle = load_data(cfg.data, cfg.seed) if data else None
    net = build_net(cfg, bundle or Shapes(cfg))  # type: ignore[arg-type]
    check_state_fits(net, state, model_path, cfg)
    unused = bp_unused(net, cfg)
    net.load_state_dict({k: v for k, v in state.items() if k not in unused}, strict=not unused)
    return cfg, net, bundle
