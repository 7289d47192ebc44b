"""Which runs a study consists of: one `Run` per training, with its `sidpipe train` overrides.

Every run is single-process (`pipeline.stages=1`). Its overrides are, in order: the settings
every study run shares (epochs, batch size, validation fraction, seed, ...), the study's own
choices (data, model, blocks, method, noise, alpha, ...), then the user's train overrides.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidpipe.config import VECTOR_MODELS, Method, StudyConfig, compose_config
from sidpipe.errors import ConfigError

STUDIES = ("reference", "blockwise", "noise", "alpha")
MLP_DEPTH = 8  # the mlp gets 8 natural layers so that 2, 4 and 8 blocks all exist
NATURAL_LAYERS = {"mlp": MLP_DEPTH, "simplecnn": 4, "vgg11": 8, "resnet18": 8, "vit_tiny": 12}
STUDY_EPOCHS = {"reference": 20, "blockwise": 10, "noise": 10, "alpha": 10}
STUDY_DATASETS = {
    "reference": ["mnist"],
    "blockwise": ["mnist", "fashion_mnist"],
    "noise": ["mnist"],
    "alpha": ["mnist"],
}
# study.tiny=true: these values unless the command line gives them (CI: about a minute).
TINY: dict[str, Any] = {
    "seeds": [0],
    "epochs": 1,
    "batch_size": 64,
    "datasets": ["digits"],
    "models": ["mlp"],
    "blocks": [2, 4],
    "noise": [0.0, 0.4],
    "alphas": [0.1, 0.9],
}
# Keys a study sets for its runs that the user may still override for every run: they change
# how a run reports, not what it measures.
FREE_KEYS = ("progress", "logger")
# Where to say the setting of a key the study owns, for the error message.
OWNER = {
    "seed": "study.seeds",
    "train.epochs": "study.epochs",
    "train.batch_size": "study.batch_size",
    "data": "study.datasets",
    "data.subset": "study.subset",
    "data.val_fraction": "study.val_fraction",
    "data.label_noise": "study.noise",
    "model": "study.models or study.arch",
    "model.blocks": "study.blocks or study.arch",
    "model.depth": f"study runs give the mlp {MLP_DEPTH} layers",
    "method": "every study trains both methods",
    "sid.variant": "study.arch",
    "sid.alpha": "study.alphas, or study.methods=[greedy] for alpha=1",
    "sid.kl_direction": "study.kl",
    "pipeline.stages": "study runs are single-process",
    "pipeline.threads": "study.threads",
    "pipeline.microbatches": "a study's BP runs take the whole batch as one microbatch, so "
    "BatchNorm normalises over the same samples as in SID",
    "model.head": "study.heads",
    "experiment": "study.arch=[shared] is the reference setting",
}


def tiny_overrides() -> list[str]:
    """`study.tiny=true` as overrides that go before the user's (whose values win)."""

    def value(v: Any) -> str:
        return "[" + ",".join(str(x) for x in v) + "]" if isinstance(v, list) else str(v)

    return [f"study.{k}={value(v)}" for k, v in TINY.items()]


def override_key(override: str) -> str:
    """The config key an override sets: `+a.b=1` -> a.b; `data.name=x` -> data (the group)."""
    key = override.lstrip("+~").split("=", 1)[0]
    return {"data.name": "data", "model.name": "model"}.get(key, key)


def is_study_key(override: str) -> bool:
    key = override_key(override)
    return key == "study" or key.startswith("study.")


def parse_arch(arch: str) -> tuple[str, int | None]:
    """`shared` -> ("shared", None); `simplecnn-b4` -> ("simplecnn", 4)."""
    if arch == "shared":
        return "shared", None
    m = re.fullmatch(r"([a-z0-9_]+)-b(\d+)", str(arch))
    if not m or m.group(1) not in NATURAL_LAYERS:
        raise ConfigError(
            f"study.arch={arch!r} must be shared or <model>-b<blocks>, e.g. simplecnn-b4"
        )
    return m.group(1), int(m.group(2))


@dataclass
class Run:
    study: str
    name: str  # folder under runs/<study>/
    labels: dict[str, Any]  # dataset, model, blocks, method, variant, seed, noise, alpha, kl
    overrides: list[str]  # the `sidpipe train` overrides of this run, the user's last
    skip_reason: str | None = None
    epochs: int = 1
    owned: int = 0  # how many of the overrides are the study's own (the rest are the user's)

    @property
    def group(self) -> str:
        """The run's configuration without the seed (seeds are aggregated)."""
        return re.sub(r"-s\d+$", "", self.name)


def common_overrides(s: StudyConfig, epochs: int, seed: int) -> list[str]:
    out = [
        "pipeline.stages=1",
        f"pipeline.threads={s.threads}",
        "progress=false",
        "logger=console",
        f"train.epochs={epochs}",
        f"train.batch_size={s.batch_size}",
        f"data.val_fraction={s.val_fraction}",
        f"seed={seed}",
    ]
    if s.subset:
        out.append(f"data.subset={s.subset}")
    return out


def arch_overrides(arch: str) -> tuple[list[str], dict[str, Any]]:
    model, blocks = parse_arch(arch)
    if model == "shared":
        return ["experiment=mnist_reference", "sid.variant=shared"], {
            "model": "simplecnn",
            "variant": "shared",
            "blocks": 5,
        }
    out = [f"model={model}", f"model.blocks={blocks}", "sid.variant=blockwise"]
    if model == "mlp":
        out.append(f"model.depth={MLP_DEPTH}")
    return out, {"model": model, "variant": "blockwise", "blocks": blocks}


# The folder name's digest leaves out the seed, the thread count (speed only) and where the
# data lives: the seeds of one configuration share a group name, and a run is reused only when
# the settings that change its result match.
DIGEST_SKIPS = ("seed=", "pipeline.threads=", "data.root=", "+data.root=", "++data.root=")


def make_run(
    study: str,
    s: StudyConfig,
    extra: list[str],
    labels: dict[str, Any],
    specific: list[str],
    skip: str | None = None,
) -> Run:
    epochs = s.epochs or STUDY_EPOCHS[study]
    seed = labels["seed"]
    # The study's own choices come after the shared ones, the user's overrides last.
    owned = [*common_overrides(s, epochs, seed), *specific]
    overrides = [*owned, *extra]
    unseeded = [o for o in overrides if not o.startswith(DIGEST_SKIPS)]
    digest = hashlib.sha1("\n".join(unseeded).encode()).hexdigest()[:8]
    parts = [labels.get("dataset"), labels.get("arch") or labels.get("model")]
    if labels.get("blocks") and study == "blockwise":
        parts.append(f"b{labels['blocks']}")
    if labels.get("head") not in (None, "pool"):  # pool: the names runs had before heads
        parts.append(labels["head"])
    if labels.get("noise") is not None:
        parts.append(f"noise{labels['noise']:g}")
    if labels.get("kl"):
        parts.append(labels["kl"])
    if labels.get("alpha") is not None:
        parts.append(f"alpha{labels['alpha']:g}")
    parts += [labels["method"], f"e{epochs}", digest, f"s{seed}"]
    name = "-".join(str(p) for p in parts if p is not None)
    return Run(study, name, {**labels, "epochs": epochs}, overrides, skip, epochs, len(owned))


def datasets(s: StudyConfig, study: str) -> list[str]:
    """study.datasets if given (it applies to every study run), else the study's own."""
    return list(s.datasets or STUDY_DATASETS[study])


def archs(s: StudyConfig, study: str) -> list[str]:
    """study.arch if given; else the reference setting (tiny: shared for noise, the blockwise
    mlp for alpha, so that CI covers both kinds at half the cost)."""
    if s.arch:
        return list(s.arch)
    return ["mlp-b4" if s.tiny and study == "alpha" else "shared"]


def plan_reference(s: StudyConfig, extra: list[str]) -> list[Run]:
    runs = []
    for data in datasets(s, "reference"):
        for seed in s.seeds:
            for method in ("bp", "sid"):
                specific = [
                    "experiment=mnist_reference",
                    f"data={data}",
                    "sid.variant=shared",
                    *(BP_OVERRIDES if method == "bp" else [f"method={method}"]),
                ]
                labels = {
                    "dataset": data,
                    "model": "simplecnn",
                    "arch": "shared",
                    "variant": "shared",
                    "blocks": 5,
                    "method": method,
                    "seed": seed,
                }
                runs.append(make_run("reference", s, extra, labels, specific))
    return runs


# Every BP run of a study: the whole batch in one microbatch. Single-process BP accumulates
# over pipeline.microbatches (default 4), so BatchNorm would normalise over a quarter of the
# batch SID normalises over; one microbatch makes the two see the same samples.
BP_OVERRIDES = ["method=bp", "pipeline.microbatches=1"]

# study.methods: what each local method of the blockwise study is, as train overrides.
# greedy = the label term alone (alpha=1): each module learns the labels by itself, as in
# greedy/DGL-style local learning; it isolates what SID's consistency term adds.
METHOD_OVERRIDES = {"sid": ["method=sid"], "greedy": ["method=sid", "sid.alpha=1.0"]}


def blockwise_skip(model: str, blocks: int, head: str) -> str | None:
    """Why a (model, blocks, head) cell cannot exist, or None."""
    natural = NATURAL_LAYERS[model]
    if not 1 <= blocks <= natural:
        return f"{model} has {natural} natural layers: {blocks} blocks do not exist"
    if head != "pool" and model in VECTOR_MODELS:
        return f"{model}'s blocks give vectors or tokens: model.head={head} needs (C,H,W) maps"
    return None


def plan_blockwise(s: StudyConfig, extra: list[str]) -> list[Run]:
    """BP trains all blocks + the final head end to end, which does not depend on how the
    layers are grouped: it runs once per (dataset, model, seed), the baseline of every block
    count, with the default head (unless study.baseline=false). Each of study.methods runs on
    every block count with each of study.heads."""
    runs = []
    for data in datasets(s, "blockwise"):
        for model in s.models:
            if model not in NATURAL_LAYERS:
                raise ConfigError(
                    f"study.models: {model!r} is unknown ({', '.join(NATURAL_LAYERS)})"
                )
            base = [f"model={model}", f"data={data}", "sid.variant=blockwise"]
            if model == "mlp":
                base.append(f"model.depth={MLP_DEPTH}")
            for seed in s.seeds:
                labels = {
                    "dataset": data,
                    "model": model,
                    "variant": None,
                    "blocks": None,
                    "method": "bp",
                    "seed": seed,
                }
                if s.baseline:
                    runs.append(make_run("blockwise", s, extra, labels, [*base, *BP_OVERRIDES]))
                for blocks in s.blocks:
                    for method in s.methods:
                        for head in s.heads:
                            labels = {
                                "dataset": data,
                                "model": model,
                                "variant": "blockwise",
                                "blocks": blocks,
                                "method": method,
                                "head": head,
                                "seed": seed,
                            }
                            specific = [*base, f"model.blocks={blocks}", *METHOD_OVERRIDES[method]]
                            if head != "pool":
                                specific.append(f"model.head={head}")
                            skip = blockwise_skip(model, blocks, head)
                            runs.append(make_run("blockwise", s, extra, labels, specific, skip))
    return runs


def plan_noise(s: StudyConfig, extra: list[str]) -> list[Run]:
    runs = []
    for arch in archs(s, "noise"):
        arch_o, arch_l = arch_overrides(arch)
        for data in datasets(s, "noise"):
            for rate in s.noise:
                for seed in s.seeds:
                    for method in ("bp", "sid"):
                        specific = [
                            *arch_o,
                            f"data={data}",
                            f"data.label_noise={rate}",
                            *(BP_OVERRIDES if method == "bp" else [f"method={method}"]),
                        ]
                        labels = {
                            "dataset": data,
                            "arch": arch,
                            **arch_l,
                            "noise": float(rate),
                            "method": method,
                            "seed": seed,
                        }
                        runs.append(make_run("noise", s, extra, labels, specific))
    return runs


def plan_alpha(s: StudyConfig, extra: list[str]) -> list[Run]:
    runs = []
    for arch in archs(s, "alpha"):
        arch_o, arch_l = arch_overrides(arch)
        for data in datasets(s, "alpha"):
            for seed in s.seeds:
                labels = {"dataset": data, "arch": arch, **arch_l, "method": "bp", "seed": seed}
                specific = [*arch_o, f"data={data}", *BP_OVERRIDES]
                runs.append(make_run("alpha", s, extra, labels, specific))
                for kl in s.kl:
                    for alpha in s.alphas:
                        specific = [
                            *arch_o,
                            f"data={data}",
                            "method=sid",
                            f"sid.alpha={alpha}",
                            f"sid.kl_direction={kl}",
                        ]
                        labels = {
                            "dataset": data,
                            "arch": arch,
                            **arch_l,
                            "method": "sid",
                            "kl": kl,
                            "alpha": float(alpha),
                            "seed": seed,
                        }
                        runs.append(make_run("alpha", s, extra, labels, specific))
    return runs


PLANS: dict[str, Callable[[StudyConfig, list[str]], list[Run]]] = {
    "reference": plan_reference,
    "blockwise": plan_blockwise,
    "noise": plan_noise,
    "alpha": plan_alpha,
}


def check_owned(plans: dict[str, list[Run]], extra: list[str]) -> None:
    """A train override of a key the study sets per run would silently relabel the results
    (e.g. `seed=3` under `seed=0`'s name): refuse it, naming the study key to use instead."""
    owned = {
        override_key(o) for runs in plans.values() for r in runs for o in r.overrides[: r.owned]
    }
    for o in extra:
        key = override_key(o)
        if key in owned and key not in FREE_KEYS:
            hint = OWNER.get(key, "the study sets it")
            raise ConfigError(f"{key} is set by the study for each run ({hint}); got {o!r}")


def plan(s: StudyConfig, extra: list[str]) -> dict[str, list[Run]]:
    """The runs of study.name (`all`: the four training studies; `depth` trains nothing)."""
    studies = list(STUDIES) if s.name == "all" else [s.name]
    plans = {name: PLANS[name](s, extra) for name in studies if name != "depth"}
    check_owned(plans, extra)
    return plans


def cost_key(run: Run) -> tuple:
    """Runs that cost the same per epoch (seed, alpha, noise and KL direction aside); the
    head changes the cost (and what validate() must compose)."""
    lab = run.labels
    return (lab["dataset"], lab.get("arch") or lab["model"], lab.get("blocks"), lab["method"],
            lab.get("head"))  # fmt: skip


def plan_lines(plans: dict[str, list[Run]]) -> list[str]:
    """`study.plan=true`: every run and its overrides (or why it is skipped)."""
    lines = []
    for study, runs in plans.items():
        lines.append(f"# {study}: {len(runs)} runs")
        for r in runs:
            what = f"SKIP {r.skip_reason}" if r.skip_reason else " ".join(r.overrides)
            lines.append(f"{r.name}: {what}")
    return lines


def validate(plans: dict[str, list[Run]]) -> None:
    """Compose one run of each kind (the settings every run shares, the user's overrides and
    the study's choices): a combination `sidpipe train` would refuse fails here, before any
    training, in one line naming the run."""
    seen = set()
    for study, runs in plans.items():
        for r in runs:
            if r.skip_reason or (study, cost_key(r)) in seen:
                continue
            seen.add((study, cost_key(r)))
            try:
                cfg = compose_config(r.overrides)
            except ConfigError as e:
                raise ConfigError(f"run {study}/{r.name}: {e}") from None
            check_bn_batch(cfg, f"{study}/{r.name}")


def check_bn_batch(cfg: Any, name: str) -> None:
    """BP and SID must normalise BatchNorm over the same batch: a BP run split into
    microbatches would see 1/M of the samples SID sees in each normalisation."""
    m = cfg.pipeline.microbatches
    if cfg.method is Method.bp and m != 1:
        raise ConfigError(
            f"run {name}: BP would normalise BatchNorm over train.batch_size/{m} samples, SID "
            f"over the whole batch of {cfg.train.batch_size}; a study's BP runs need "
            "pipeline.microbatches=1"
        )
