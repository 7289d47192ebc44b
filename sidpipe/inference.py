"""`sidpipe eval MODEL.pt [overrides]` and `sidpipe generate MODEL.pt`: plain single-process
inference of an exported model (export.py writes it; saved.py reads it back as untrusted
data). Eval reports every depth's accuracy (bits per byte for language models) and early
exit (method/anytime.py): quality against the mean number of modules used, over exit
thresholds, with a plot. Generate samples text from an exported language model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from sidpipe.config import LANGUAGE_MODELS, Method
from sidpipe.data import eval_splits
from sidpipe.errors import ConfigError, OneLineParser, SidpipeError, fail
from sidpipe.method.anytime import check_threshold, exit_curve, generate
from sidpipe.method.step import evaluate_split, make_method
from sidpipe.runtime.device import select_device
from sidpipe.saved import TRUST_HELP, first_line, load_exported
from sidpipe.tokenizer import text_tokenizer

THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # eval's default exit thresholds


def evaluate_model(
    model_path: str | Path,
    overrides: list[str],
    thresholds: tuple[float, ...] = THRESHOLDS,
    plot: Path | None = None,
    trust: str | None = None,
) -> dict[str, Any]:
    """Plain single-process inference of an exported model on the test split: every depth,
    and (SID models) early exit at each threshold; `plot` draws that curve."""
    model_path = Path(model_path)
    cfg, net, data = load_exported(model_path, overrides, trust=trust)
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
        raise ConfigError(f"cannot write the plot {path}: {e.strerror or first_line(e)}") from None
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
    trust: str | None = None,
) -> tuple[str, list[int]]:
    """Sample from an exported language model (bytes decoded as UTF-8, bad bytes replaced)."""
    model_path = Path(model_path)
    cfg, net, _ = load_exported(model_path, [], data=False, trust=trust)
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
    tok = text_tokenizer(cfg.data, None)  # bytes, or the export's BPE (hash checked)
    tokens = tok.encode(prompt.encode("utf-8") or b"\n").long()
    g = torch.Generator().manual_seed(seed)
    bp = cfg.method is Method.bp  # every block, then the final head on the uniform prior
    seq, used = generate(net, tokens, n_tokens, depth, threshold, temperature, g, bp=bp)
    text = tok.decode(seq.tolist()).decode("utf-8", errors="replace")
    return text, used


# generate: a bound, so a typo (--tokens 1000000000) fails instead of running for days
MAX_TOKENS = 100_000
GENERATE_HELP = (
    "Sample N tokens after TEXT from an exported language model: from module D, or per token "
    "from the first module whose belief's top probability reaches P (early exit), else the "
    "last module. The text goes to stdout, the modules used (mean per token) to stderr."
)
EVAL_HELP = (
    "Test accuracy of an exported model at every depth, single process. The overrides are "
    "train's, applied to the run config saved in MODEL.pt.json as train applies them to "
    "conf/config.yaml (e.g. data=fashion_mnist data.root=DIR). Language models also report "
    "bits per byte; SID models also report early exit (quality against the mean number of "
    "modules used, per threshold)."
)


def _parser(command: str) -> OneLineParser:
    prog = f"sidpipe {command}"
    if command == "generate":
        ap = OneLineParser(prog=prog, description=GENERATE_HELP)
        ap.add_argument("model", metavar="MODEL.pt")
        ap.add_argument("--prompt", default="", metavar="TEXT")
        ap.add_argument("--tokens", type=int, default=200, metavar="N",
                        help="tokens to sample: bytes, or BPE tokens decoded with the "
                             f"export's tokenizer (1..{MAX_TOKENS:,}; default 200)")  # fmt: skip
        where = ap.add_mutually_exclusive_group()
        where.add_argument("--depth", type=int, metavar="D")
        where.add_argument("--threshold", type=float, metavar="P")
        ap.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="0 takes the most likely token (default 1)")  # fmt: skip
        ap.add_argument("--seed", type=int, default=0, metavar="S")
    else:
        ap = OneLineParser(prog=prog, description=EVAL_HELP)
        ap.add_argument("model", metavar="MODEL.pt")
        ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
        ap.add_argument("--thresholds", metavar="P,P,...",
                        help="early-exit thresholds (default 0.3..0.99)")  # fmt: skip
        ap.add_argument("--plot", metavar="PATH", help="default MODEL.pt.exit.png")
    ap.add_argument("--trust-target", metavar="TARGET", help=TRUST_HELP)
    return ap


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        return tuple(check_threshold(float(t)) for t in text.split(","))
    except ValueError as e:
        raise ConfigError(
            f"--thresholds={text!r}: {e}"
            if "threshold" in str(e)
            else f"--thresholds={text!r} must be numbers separated by commas"
        ) from None


def _check_generate(args: argparse.Namespace) -> None:
    """Bad generate options, refused before the model is read."""
    if args.threshold is not None:
        try:
            check_threshold(args.threshold)
        except ValueError as e:
            raise ConfigError(f"--threshold: {e}") from None
    if not 1 <= args.tokens <= MAX_TOKENS:
        raise ConfigError(f"--tokens={args.tokens} must be in 1..{MAX_TOKENS:,}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed={args.seed} must be in 0..2**63-1")
    if not 0 <= args.temperature < float("inf"):
        raise ConfigError(f"--temperature={args.temperature} must be a finite number >= 0")


def main(command: str, argv: list[str]) -> None:
    parser = _parser(command)
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return
    args = parser.parse_intermixed_args(argv)
    try:
        if command == "generate":
            _check_generate(args)
            text, used = generate_text(
                args.model, args.prompt, args.tokens, args.depth, args.threshold,
                args.temperature, args.seed, args.trust_target,
            )  # fmt: skip
            print(text)
            print(f"sidpipe: {len(used)} tokens, mean modules used {sum(used) / len(used):.2f}",
                  file=sys.stderr)  # fmt: skip
        else:
            thresholds = _thresholds(args.thresholds) if args.thresholds else THRESHOLDS
            plot = Path(args.plot or args.model + ".exit.png")
            result = evaluate_model(args.model, args.overrides, thresholds, plot, args.trust_target)
            print(json.dumps(result, indent=2))
    except SidpipeError as e:
        fail(str(e).splitlines()[0], getattr(e, "exit_code", 1))
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's 130
        fail("interrupted by SIGINT", 130)
    sys.stdout.flush()
