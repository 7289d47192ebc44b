"""`sidpipe export SOURCE OUT.pt`, `sidpipe eval OUT.pt [overrides]`, `sidpipe generate OUT.pt`.

Export merges every stage's parameters into one ordinary state_dict of the whole network
(blocks + heads), loadable into the single-process model for plain feed-forward inference.
SOURCE is a run directory (its `model/stage*.pt`) or a checkpoint directory (`step_*`). The
run's config travels beside it as OUT.pt.json, so `sidpipe eval` can rebuild the network.

Eval composes its overrides exactly as `sidpipe train` does (hydra: group choices such as
`data=mnist`, keys such as `data.root=DIR`), with the saved run config in place of
conf/config.yaml. Before any weight is loaded it checks that the file is a plain state_dict
(read weights-only: no file runs code), that the data has the input shape and classes the
model was exported for, and that the rebuilt network has exactly the file's parameter names
and shapes; each failure is one line naming the file and both sides. Eval also measures
early exit (method/anytime.py): quality against the mean number of modules used, over exit
thresholds, with a plot. Generate samples text from an exported language model.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
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
)
from sidpipe.data import DATASET_SHAPES, VOCAB, DataBundle, eval_splits, load_data
from sidpipe.errors import CheckpointError, ConfigError, SidpipeError, fail
from sidpipe.method.anytime import check_threshold, exit_curve, generate
from sidpipe.method.step import evaluate_split, make_method
from sidpipe.models import BlockNet, build_net
from sidpipe.models.partition import StageModule
from sidpipe.runtime import checkpoint
from sidpipe.runtime.device import select_device
from sidpipe.runtime.io import atomic_write_json

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


def compose_for_eval(saved: dict[str, Any], overrides: list[str], side: Path) -> Config:
    """compose_saved, with a saved config that does not compose blamed on its file."""
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


def _first_line(e: BaseException) -> str:
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
            f"cannot load {path}: not a torch-saved state_dict ({_first_line(e)})"
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
        raise CheckpointError(f"cannot read {side} ({_first_line(e)})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise CheckpointError(f"{side} is not an export's run config (no 'config' mapping)")
    return raw["config"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} ({_first_line(e)})") from None


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


def check_state_fits(
    net: torch.nn.Module, state: dict[str, torch.Tensor], model_path: Path, cfg: Config
) -> None:
    """The rebuilt network must have exactly the file's parameter names and shapes."""
    want = {k: list(v.shape) for k, v in net.state_dict().items()}
    have = {k: list(v.shape) for k, v in state.items()}
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


# ----------------------------------------------------------------------------- commands


class _Shapes:
    """What build_net reads from a DataBundle, from the data config alone: building a
    network for export needs no data files (text: windows of data.context bytes)."""

    def __init__(self, cfg: Config):
        if cfg.data.name in TEXT_DATASETS:
            self.in_shape, self.num_classes = (cfg.data.context,), VOCAB
        else:
            self.in_shape, self.num_classes = DATASET_SHAPES[cfg.data.name]


def _from_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = checkpoint.verify(path)
    cfg = compose_for_eval(meta["config"], [], path / "meta.json")
    net = build_net(cfg, _Shapes(cfg))  # type: ignore[arg-type]
    for r, (a, b) in enumerate(meta["partition"]):
        # each stage saved the module it trained: a slice of blocks (SID) or the whole net
        whole = meta["stages"] == 1 and (cfg.method is Method.bp or not isinstance(net, BlockNet))
        part = net if whole else StageModule(net, range(a, b))
        checkpoint.load(path, r, part, [])
    return net.state_dict(), meta["config"]


def _from_run(source: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every stage's model/stage{r}.pt, each read weights-only and named when it fails."""
    summary = _read_json(source / "summary.json")
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise CheckpointError(f"{source / 'summary.json'} has no run config ('config')")
    parts = sorted((source / "model").glob("stage*.pt"))
    if not parts:
        raise CheckpointError(f"{source / 'model'} holds no stage*.pt: the run saved no model")
    state: dict[str, torch.Tensor] = {}
    for p in parts:
        state.update(read_state(p))
    return state, summary["config"]


def export_model(source: str | Path, out: str | Path) -> Path:
    source, out = Path(source), Path(out)
    if not source.exists():
        raise ConfigError(f"{source} not found: give a finished run directory or a checkpoint")
    if source.name.startswith(checkpoint.PREFIX) and source.is_dir():
        state, raw_cfg = _from_checkpoint(source)
    elif (source / "model").is_dir() and (source / "summary.json").exists():
        state, raw_cfg = _from_run(source)
    else:
        raise ConfigError(f"{source} is neither a finished run directory nor a checkpoint (step_*)")
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        tmp.replace(out)
        atomic_write_json(out.with_name(out.name + ".json"), {"config": raw_cfg})
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or _first_line(e)}") from None
    return out


def load_exported(
    model_path: Path, overrides: list[str], data: bool = True
) -> tuple[Config, torch.nn.Module, DataBundle | None]:
    """The exported network, checked against its config (and the data, when loaded)."""
    state = read_state(model_path)
    saved = read_sidecar(model_path)
    cfg = compose_for_eval(saved, overrides, model_path.with_name(model_path.name + ".json"))
    check_data_fits(saved, cfg, model_path)
    bundle = load_data(cfg.data, cfg.seed) if data else None
    net = build_net(cfg, bundle or _Shapes(cfg))  # type: ignore[arg-type]
    check_state_fits(net, state, model_path, cfg)
    net.load_state_dict(state)
    return cfg, net, bundle


THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # eval's default exit thresholds


def evaluate_model(
    model_path: str | Path,
    overrides: list[str],
    thresholds: tuple[float, ...] = THRESHOLDS,
    plot: Path | None = None,
) -> dict[str, Any]:
    """Plain single-process inference of an exported model on the test split: every depth,
    and (SID models) early exit at each threshold; `plot` draws that curve."""
    model_path = Path(model_path)
    cfg, net, data = load_exported(model_path, overrides)
    assert data is not None
    device = select_device(cfg)
    method = make_method(cfg, net, 1, device)
    test = eval_splits(cfg, data)["test"]
    scores = evaluate_split(method, test, device)
    per_depth = scores["accuracy"]
    out: dict[str, Any] = {
        "model": str(model_path),
        "data": cfg.data.name,
        "test_accuracy": per_depth[-1],
        "per_depth_accuracy": per_depth,
    }
    lm = cfg.model.name in LANGUAGE_MODELS
    if lm:
        out |= {"test_bpb": scores["bits"][-1], "per_depth_bpb": scores["bits"]}
    if cfg.method is Method.sid and len(per_depth) > 1:  # BP trains one exit: no curve
        out["early_exit"] = exit_curve(method, test, device, thresholds)
        if plot is not None:
            out["plot"] = str(plot_exit_curve(out, lm, plot))
    return out


def plot_exit_curve(result: dict[str, Any], lm: bool, path: Path) -> Path:
    """Quality against mean modules used: early exit per threshold, and every fixed depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = ("bits", "test bits/byte") if lm else ("accuracy", "test accuracy")
    fixed = result["per_depth_bpb"] if lm else result["per_depth_accuracy"]
    curve = result["early_exit"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(range(1, len(fixed) + 1), fixed, "s--", color="gray", label="fixed depth")
    ax.plot([c["mean_depth"] for c in curve], [c[key] for c in curve], "o-",
            label="early exit (threshold)")  # fmt: skip
    for c in curve:
        ax.annotate(f"{c['threshold']:g}", (c["mean_depth"], c[key]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))  # fmt: skip
    ax.set_xlabel("mean modules used")
    ax.set_ylabel(label)
    ax.set_title(Path(result["model"]).name, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise ConfigError(f"cannot write the plot {path}: {e.strerror or _first_line(e)}") from None
    finally:
        plt.close(fig)
    return path


def generate_text(
    model_path: str | Path,
    prompt: str,
    n_tokens: int,
    depth: int | None,
    threshold: float | None,
    temperature: float,
    seed: int,
) -> tuple[str, list[int]]:
    """Sample from an exported language model (bytes decoded as UTF-8, bad bytes replaced)."""
    model_path = Path(model_path)
    cfg, net, _ = load_exported(model_path, [], data=False)
    if cfg.model.name not in LANGUAGE_MODELS:
        raise ConfigError(
            f"{model_path} is a model={cfg.model.name} classifier; generate samples from "
            "language models (model=gpt)"
        )
    n_mod = len(net.blocks)  # type: ignore[arg-type]
    if depth is not None and not 1 <= depth <= n_mod:
        raise ConfigError(f"--depth={depth} must be in 1..{n_mod} (the model's modules)")
    if cfg.method is Method.bp and (depth not in (None, n_mod) or threshold is not None):
        raise ConfigError(f"{model_path} was trained with method=bp: only its last module has "
                          "a trained head, so --depth and --threshold do not apply")  # fmt: skip
    if not 0 <= temperature < float("inf"):
        raise ConfigError(f"--temperature={temperature} must be a finite number >= 0")
    tokens = torch.tensor(list(prompt.encode("utf-8")) or [ord("\n")], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    seq, used = generate(net, tokens, n_tokens, depth, threshold, temperature, g)
    text = bytes(seq.tolist()).decode("utf-8", errors="replace")
    return text, used


USAGE = {
    "generate": "usage: sidpipe generate MODEL.pt [--prompt TEXT] [--tokens N] [--depth D | "
    "--threshold P]\n                        [--temperature T] [--seed S]\n\n"
    "Sample N bytes (default 200) after TEXT from an exported language model: from module D,\n"
    "or per token from the first module whose belief's top probability reaches P (early exit),\n"
    "else the last module. --temperature 0 takes the most likely byte. The text goes to\n"
    "stdout, the modules used (mean per token) to stderr.",
    "export": "usage: sidpipe export RUN_DIR|CHECKPOINT_DIR OUT.pt\n\n"
    "Merge a run's (or a checkpoint's) stage parameters into one state_dict OUT.pt, with the\n"
    "run's config beside it in OUT.pt.json.",
    "eval": "usage: sidpipe eval MODEL.pt [overrides ...]\n\n"
    "Test accuracy of an exported model at every depth, single process. The overrides are\n"
    "train's, applied to the run config saved in MODEL.pt.json as train applies them to\n"
    "conf/config.yaml (e.g. data=fashion_mnist data.root=DIR). The data must have the input\n"
    "shape and classes, and the model settings the parameters, the model was exported with.\n"
    "Language models also report bits per byte. SID models also report early exit: quality\n"
    "against the mean number of modules used, per threshold (--thresholds=0.5,0.9,...; the\n"
    "default 0.3..0.99), plotted to --plot=PATH (default MODEL.pt.exit.png).",
}


def _options(argv: list[str], names: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Split `--name=value` / `--name value` options (of `names`) from the rest."""
    opts: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if name is None:
            rest.append(a)
        elif name not in names:
            raise ConfigError(f"unknown option {a.split('=', 1)[0]} (options: "
                              f"{', '.join('--' + n for n in names)})")  # fmt: skip
        elif "=" in a:
            opts[name] = a.split("=", 1)[1]
        elif i + 1 < len(argv):
            opts[name] = argv[i + 1]
            i += 1
        else:
            raise ConfigError(f"option {a} needs a value")
        i += 1
    return opts, rest


_KINDS = {int: "an integer", float: "a number"}


def _number(opts: dict[str, str], name: str, kind: type, default: Any) -> Any:
    if name not in opts:
        return default
    try:
        return kind(opts[name])
    except ValueError:
        raise ConfigError(f"--{name}={opts[name]!r} is not {_KINDS[kind]}") from None


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        return tuple(check_threshold(float(t)) for t in text.split(","))
    except ValueError as e:
        raise ConfigError(f"--thresholds={text!r}: {e}" if "threshold" in str(e) else
                          f"--thresholds={text!r} must be numbers separated by commas") from None


def main(command: str, argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE[command])
        return
    try:
        if command == "export":
            if len(argv) != 2:
                fail(USAGE["export"].splitlines()[0], 2)
            print(f"exported {export_model(argv[0], argv[1])}")
        elif command == "generate":
            names = ("prompt", "tokens", "depth", "threshold", "temperature", "seed")
            opts, rest = _options(argv, names)
            if len(rest) != 1:
                fail(USAGE["generate"].splitlines()[0], 2)
            threshold = _number(opts, "threshold", float, None)
            if threshold is not None:
                try:
                    check_threshold(threshold)
                except ValueError as e:
                    raise ConfigError(f"--threshold: {e}") from None
            if threshold is not None and "depth" in opts:
                raise ConfigError("give --depth or --threshold, not both")
            n = _number(opts, "tokens", int, 200)
            if n < 1:
                raise ConfigError(f"--tokens={n} must be >= 1")
            text, used = generate_text(
                rest[0], opts.get("prompt", ""), n, _number(opts, "depth", int, None), threshold,
                _number(opts, "temperature", float, 1.0), _number(opts, "seed", int, 0),
            )  # fmt: skip
            print(text)
            print(f"sidpipe: {len(used)} bytes, mean modules used {sum(used) / len(used):.2f}",
                  file=sys.stderr)  # fmt: skip
        else:
            opts, rest = _options(argv, ("thresholds", "plot"))
            if not rest:
                fail(USAGE["eval"].splitlines()[0], 2)
            thresholds = _thresholds(opts["thresholds"]) if "thresholds" in opts else THRESHOLDS
            plot = Path(opts.get("plot", rest[0] + ".exit.png"))
            print(json.dumps(evaluate_model(rest[0], rest[1:], thresholds, plot), indent=2))
    except SidpipeError as e:
        fail(str(e).splitlines()[0], getattr(e, "exit_code", 1))
    sys.stdout.flush()
