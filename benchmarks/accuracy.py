"""Accuracy studies of SID against backprop (issue 7): does the paper's story hold?

    python benchmarks/accuracy.py study=reference|blockwise|depth|noise|alpha|all [knobs] [...]

Studies (each single-process, `pipeline.stages=1`; every run is `sidpipe.train.run` in this
process, or in `jobs` worker processes):

  reference  the reference setting (`experiment=mnist_reference`: shared SimpleCNN extractor,
             5 belief modules, Adam 1e-3, batch 256, 20 epochs, MNIST): `sid.variant=shared`
             vs BP on the same chain. The authors' log reports best-epoch BP 99.06 vs SID 99.31.
  blockwise  blockwise SID vs BP at equal architecture for `models` x `datasets` x `blocks`.
             BP trains all blocks + the final head end to end, which does not depend on how the
             layers are grouped: it runs once per (dataset, model, seed) and is the baseline of
             every block count.
  depth      per-depth test accuracy of every SID run found in the output folder (all studies):
             does accuracy rise with depth? One plot per run configuration. Runs no training;
             every other study refreshes it.
  noise      symmetric label noise on the training labels (`noise` rates), SID vs BP, clean
             test accuracy (validation labels are held out before the noise: they stay clean).
  alpha      SID with `alphas` x `kl` directions, and the BP baseline of the same architecture.
  all        the four training studies, then depth.

Knobs (hydra-style `key=value`; lists as `[a,b]`):
  seeds=[0,1,2]  epochs=N (default per study: reference 20, others 10)  batch_size=256
  datasets=[...] (alias `data`; default: blockwise [mnist,fashion_mnist], the others [mnist])
  models=[mlp,simplecnn,vgg11,resnet18]
  blocks=[2,4,8]  subset=N (data.subset: first N training samples)  val_fraction=0.1
  noise=[0.0,0.2,0.4]  alphas=[0.1,0.3,0.5,0.7,0.9]  kl=[forward,reverse]
  arch=[shared] (noise/alpha: `shared` = the reference setting, `<model>-b<blocks>` = blockwise,
      e.g. arch=[shared,simplecnn-b4])
  threads=1 (torch threads per run)  jobs=1 (runs in parallel worker processes)
  out=DIR (default benchmarks/results/accuracy-<machine>-<date>)  plan=true (list runs only)
  estimate=true (time `estimate_steps`=6 batches of each kind of run, project the hours)
  tiny=true  (CI: digits, 1 epoch, seed 0, mlp, blocks [2,4], few alphas/noise rates)
Any other `key=value` (e.g. `optim.lr=3e-4`, `model.width=512`) is passed to every run.

A run whose folder already holds summary.json is not run again (resumable): its row says so.
Outputs in `out`: <study>.json (all rows), <study>.md (tables, each headed by the command,
seeds, epochs, machine and date), plots/<study>/*.png, depth.md, and summary.md (all
tables plus one-line findings computed from the numbers).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SIDPIPE_DATA", REPO.parent / "shared" / "data"))
if str(REPO) not in sys.path:  # `python benchmarks/accuracy.py` without an installed package
    sys.path.insert(0, str(REPO))

log = logging.getLogger("sidpipe.accuracy")

STUDIES = ("reference", "blockwise", "noise", "alpha")
PAPER_REFERENCE = {"bp": 0.9906, "sid": 0.9931}  # best-epoch test accuracy, authors' run log
MLP_DEPTH = 8  # the mlp gets 8 natural layers so that 2, 4 and 8 blocks all exist
NATURAL_LAYERS = {"mlp": MLP_DEPTH, "simplecnn": 4, "vgg11": 8, "resnet18": 8, "vit_tiny": 12}
TOL = 0.001  # accuracy differences below 0.1 point count as "matches" (or the seed spread)
METRICS = (
    ("last", "test_accuracy", "last epoch"),
    ("best", "best_epoch_test_accuracy", "best epoch (test-selected)"),
    ("val", "val_selected_test_accuracy", "val-selected"),
)

KNOB_DEFAULTS: dict[str, Any] = {
    "study": "all",
    "seeds": [0, 1, 2],
    "epochs": None,
    "batch_size": 256,
    "datasets": None,
    "models": ["mlp", "simplecnn", "vgg11", "resnet18"],
    "blocks": [2, 4, 8],
    "subset": None,
    "val_fraction": 0.1,
    "noise": [0.0, 0.2, 0.4],
    "alphas": [0.1, 0.3, 0.5, 0.7, 0.9],
    "kl": ["forward", "reverse"],
    "arch": None,
    "threads": 1,
    "jobs": 1,
    "out": None,
    "plan": False,
    "estimate": False,
    "estimate_steps": 6,
    "tiny": False,
}
STUDY_EPOCHS = {"reference": 20, "blockwise": 10, "noise": 10, "alpha": 10}
STUDY_DATASETS = {
    "reference": ["mnist"],
    "blockwise": ["mnist", "fashion_mnist"],
    "noise": ["mnist"],
    "alpha": ["mnist"],
}
TINY = {
    "seeds": [0],
    "epochs": 1,
    "batch_size": 64,
    "datasets": ["digits"],
    "models": ["mlp"],
    "blocks": [2, 4],
    "noise": [0.0, 0.4],
    "alphas": [0.1, 0.9],
}
LISTS = ("seeds", "datasets", "models", "blocks", "noise", "alphas", "kl", "arch")


# ---------------------------------------------------------------------------- arguments


class UsageError(ValueError):
    pass


def parse_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split `key=value` arguments into study knobs and overrides passed to every run."""
    from omegaconf import OmegaConf

    knobs = dict(KNOB_DEFAULTS)
    given: dict[str, Any] = {}
    extra: list[str] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if "=" not in arg:
            raise UsageError(f"argument {arg!r} is not key=value (try --help)")
        key, value = arg.split("=", 1)
        key = "datasets" if key == "data" else key
        if key in KNOB_DEFAULTS:
            given[key] = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
        else:
            extra.append(arg)
    if given.get("tiny"):
        knobs.update(TINY)
    knobs.update(given)
    for key in LISTS:
        v = knobs[key]
        if v is not None:
            knobs[key] = list(v) if isinstance(v, list | tuple) else [v]
    study = knobs["study"]
    if study not in (*STUDIES, "depth", "all"):
        raise UsageError(f"study={study!r} must be one of {', '.join(STUDIES)}, depth or all")
    for key in ("seeds", "blocks"):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in knobs[key]):
            raise UsageError(f"{key}={knobs[key]} must be a list of integers")
    for key in ("threads", "jobs", "batch_size", "estimate_steps"):
        if not isinstance(knobs[key], int) or knobs[key] < 1:
            raise UsageError(f"{key}={knobs[key]!r} must be an integer >= 1")
    if knobs["epochs"] is not None and (
        not isinstance(knobs["epochs"], int) or knobs["epochs"] < 1
    ):
        raise UsageError(f"epochs={knobs['epochs']!r} must be an integer >= 1")
    bad_kl = [k for k in knobs["kl"] if k not in ("forward", "reverse")]
    if bad_kl:
        raise UsageError(f"kl={knobs['kl']} may only hold forward and reverse")
    for a in knobs["arch"] or []:
        parse_arch(a)
    return knobs, extra


def parse_arch(arch: str) -> tuple[str, int | None]:
    """`shared` -> ("shared", None); `simplecnn-b4` -> ("simplecnn", 4)."""
    if arch == "shared":
        return "shared", None
    m = re.fullmatch(r"([a-z0-9_]+)-b(\d+)", str(arch))
    if not m or m.group(1) not in NATURAL_LAYERS:
        raise UsageError(f"arch={arch!r} must be `shared` or <model>-b<blocks>, e.g. simplecnn-b4")
    return m.group(1), int(m.group(2))


# ---------------------------------------------------------------------------- run plans


@dataclass
class Run:
    study: str
    name: str  # folder under runs/<study>/
    labels: dict[str, Any]  # dataset, model, blocks, method, variant, seed, noise, alpha, kl
    overrides: list[str]  # hydra overrides of `sidpipe train`, data.root excluded
    skip_reason: str | None = None
    epochs: int = 1

    @property
    def group(self) -> str:
        """The run's configuration without the seed (seeds are aggregated)."""
        return re.sub(r"-s\d+$", "", self.name)


def common_overrides(knobs: dict[str, Any], epochs: int, seed: int) -> list[str]:
    out = [
        "pipeline.stages=1",
        f"pipeline.threads={knobs['threads']}",
        "progress=false",
        "logger=console",
        f"train.epochs={epochs}",
        f"train.batch_size={knobs['batch_size']}",
        f"data.val_fraction={knobs['val_fraction']}",
        f"seed={seed}",
    ]
    if knobs["subset"]:
        out.append(f"data.subset={knobs['subset']}")
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


def make_run(
    study: str,
    knobs: dict[str, Any],
    extra: list[str],
    labels: dict[str, Any],
    specific: list[str],
    skip: str | None = None,
) -> Run:
    epochs = knobs["epochs"] or STUDY_EPOCHS[study]
    seed = labels["seed"]
    # The study's own choices come after the shared ones, the user's overrides last.
    overrides = [*common_overrides(knobs, epochs, seed), *specific, *extra]
    # The folder name carries a digest of everything but the seed (and the thread count, which
    # changes the speed only): a run is reused only when its settings match, and the seeds of
    # one configuration share a group name.
    unseeded = [o for o in overrides if not o.startswith(("seed=", "pipeline.threads="))]
    digest = hashlib.sha1("\n".join(unseeded).encode()).hexdigest()[:8]
    parts = [labels.get("dataset"), labels.get("arch") or labels.get("model")]
    if labels.get("blocks") and study == "blockwise":
        parts.append(f"b{labels['blocks']}")
    if labels.get("noise") is not None:
        parts.append(f"noise{labels['noise']:g}")
    if labels.get("kl"):
        parts.append(labels["kl"])
    if labels.get("alpha") is not None:
        parts.append(f"alpha{labels['alpha']:g}")
    parts += [labels["method"], f"e{epochs}", digest, f"s{seed}"]
    name = "-".join(str(p) for p in parts if p is not None)
    return Run(study, name, {**labels, "epochs": epochs}, overrides, skip, epochs)


def datasets(knobs: dict[str, Any], study: str) -> list[str]:
    """The `datasets` knob if given (it applies to every study run), else the study's own."""
    return knobs["datasets"] or STUDY_DATASETS[study]


def archs(knobs: dict[str, Any], study: str) -> list[str]:
    """The `arch` knob if given; else the reference setting (tiny: shared for noise, the
    blockwise mlp for alpha, so that CI covers both kinds at half the cost)."""
    if knobs["arch"]:
        return knobs["arch"]
    return ["mlp-b4" if knobs["tiny"] and study == "alpha" else "shared"]


def plan_reference(knobs: dict[str, Any], extra: list[str]) -> list[Run]:
    runs = []
    for data in datasets(knobs, "reference"):
        for seed in knobs["seeds"]:
            for method in ("bp", "sid"):
                specific = [
                    "experiment=mnist_reference",
                    f"data={data}",
                    "sid.variant=shared",
                    f"method={method}",
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
                runs.append(make_run("reference", knobs, extra, labels, specific))
    return runs


def plan_blockwise(knobs: dict[str, Any], extra: list[str]) -> list[Run]:
    runs = []
    for data in datasets(knobs, "blockwise"):
        for model in knobs["models"]:
            if model not in NATURAL_LAYERS:
                raise UsageError(f"models: {model!r} is unknown ({', '.join(NATURAL_LAYERS)})")
            natural = NATURAL_LAYERS[model]
            base = [f"model={model}", f"data={data}", "sid.variant=blockwise"]
            if model == "mlp":
                base.append(f"model.depth={MLP_DEPTH}")
            for seed in knobs["seeds"]:
                labels = {
                    "dataset": data,
                    "model": model,
                    "variant": None,
                    "blocks": None,
                    "method": "bp",
                    "seed": seed,
                }
                runs.append(make_run("blockwise", knobs, extra, labels, [*base, "method=bp"]))
                for blocks in knobs["blocks"]:
                    skip = None
                    if not 1 <= blocks <= natural:
                        skip = f"{model} has {natural} natural layers: {blocks} blocks do not exist"
                    labels = {
                        "dataset": data,
                        "model": model,
                        "variant": "blockwise",
                        "blocks": blocks,
                        "method": "sid",
                        "seed": seed,
                    }
                    specific = [*base, f"model.blocks={blocks}", "method=sid"]
                    runs.append(make_run("blockwise", knobs, extra, labels, specific, skip))
    return runs


def plan_noise(knobs: dict[str, Any], extra: list[str]) -> list[Run]:
    runs = []
    for arch in archs(knobs, "noise"):
        arch_o, arch_l = arch_overrides(arch)
        for data in datasets(knobs, "noise"):
            for rate in knobs["noise"]:
                for seed in knobs["seeds"]:
                    for method in ("bp", "sid"):
                        specific = [
                            *arch_o,
                            f"data={data}",
                            f"data.label_noise={rate}",
                            f"method={method}",
                        ]
                        labels = {
                            "dataset": data,
                            "arch": arch,
                            **arch_l,
                            "noise": float(rate),
                            "method": method,
                            "seed": seed,
                        }
                        runs.append(make_run("noise", knobs, extra, labels, specific))
    return runs


def plan_alpha(knobs: dict[str, Any], extra: list[str]) -> list[Run]:
    runs = []
    for arch in archs(knobs, "alpha"):
        arch_o, arch_l = arch_overrides(arch)
        for data in datasets(knobs, "alpha"):
            for seed in knobs["seeds"]:
                labels = {"dataset": data, "arch": arch, **arch_l, "method": "bp", "seed": seed}
                runs.append(
                    make_run("alpha", knobs, extra, labels, [*arch_o, f"data={data}", "method=bp"])
                )
                for kl in knobs["kl"]:
                    for alpha in knobs["alphas"]:
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
                        runs.append(make_run("alpha", knobs, extra, labels, specific))
    return runs


PLANS: dict[str, Callable[[dict[str, Any], list[str]], list[Run]]] = {
    "reference": plan_reference,
    "blockwise": plan_blockwise,
    "noise": plan_noise,
    "alpha": plan_alpha,
}


# ---------------------------------------------------------------------------- execution


def train_overrides(run: Run) -> list[str]:
    return [f"data.root={DATA}", *run.overrides]


def execute(run: Run, run_dir: str) -> dict[str, Any]:
    """Compose the run's config exactly as `sidpipe train` would, then train in this process."""
    from hydra import compose, initialize_config_dir

    from sidpipe.train import CONF_DIR, to_config
    from sidpipe.train import run as train_run

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        dcfg = compose(config_name="config", overrides=train_overrides(run))
    cfg = to_config(dcfg)
    return train_run(cfg, run_dir)


def _worker(run: Run, run_dir: str) -> dict[str, Any]:
    """Process-pool entry: one run, its summary or the error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return {"summary": execute(run, run_dir)}
    except Exception as e:  # noqa: BLE001 - recorded in the row, the study goes on
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def run_all(runs: list[Run], out: Path, jobs: int, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Train every run not done yet; one row per run (resumable: summary.json = done)."""
    rows: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, Run, Path]] = []
    for i, run in enumerate(runs):
        run_dir = out / "runs" / run.study / run.name
        row = {
            "study": run.study,
            "name": run.name,
            "group": run.group,
            **run.labels,
            "subset": meta["knobs"]["subset"],
            "invocation": meta["id"],
            "run_dir": str(run_dir.relative_to(out)),
            "command": shlex.join(
                ["sidpipe", "train", *train_overrides(run), f"hydra.run.dir={run_dir}"]
            ),
        }
        rows[i] = row
        if run.skip_reason:
            row.update(status="skipped", reason=run.skip_reason)
        elif (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
            row.update(status="reused", reason=f"result exists: {row['run_dir']}/summary.json")
            row.update(extract(summary))
        else:
            if run_dir.exists():  # an interrupted run: start it again from scratch
                shutil.rmtree(run_dir)
            todo.append((i, run, run_dir))
    if todo:
        log.info("%d run(s) to train, %d done or skipped", len(todo), len(runs) - len(todo))
    t0 = time.perf_counter()

    def record(k: int, i: int, result: dict[str, Any]) -> None:
        if "summary" in result:
            rows[i].update(status="ran", **extract(result["summary"]))
        else:
            rows[i].update(status="failed", reason=result["error"])
            log.error(
                "run %s failed: %s\n%s",
                rows[i]["name"],
                result["error"],
                result.get("traceback", ""),
            )
        log.info(
            "[%d/%d] %s: %s (%.0f s so far)",
            k,
            len(todo),
            rows[i]["name"],
            rows[i]["status"],
            time.perf_counter() - t0,
        )

    if jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_worker, run, str(d)): i for i, run, d in todo}
            for k, fut in enumerate(as_completed(futures), 1):
                record(k, futures[fut], fut.result())
    else:
        for k, (i, run, d) in enumerate(todo, 1):
            log.info("[%d/%d] training %s", k, len(todo), run.name)
            record(k, i, _worker(run, str(d)))
    return [rows[i] for i in range(len(runs))]


def extract(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers a study needs from a run's summary.json."""
    epochs = summary.get("epochs_run") or 1
    evals = summary.get("evaluations") or []
    return {
        "test_accuracy": summary.get("test_accuracy"),
        "best_epoch_test_accuracy": summary.get("best_epoch_test_accuracy"),
        "val_selected_test_accuracy": summary.get("val_selected_test_accuracy"),
        "best_epoch": summary.get("best_epoch"),
        "val_selected_epoch": summary.get("val_selected_epoch"),
        "per_depth_accuracy": summary.get("per_depth_accuracy") or [],
        "val_per_depth": (evals[-1].get("val_per_depth") if evals else None) or [],
        "epochs_run": summary.get("epochs_run"),
        "s_per_epoch": summary.get("train_s", summary.get("wall_s", 0.0)) / epochs,
        "samples_per_s": summary.get("samples_per_s"),
        "wall_s": summary.get("wall_s"),
        "label_noise_rate": summary.get("label_noise_rate"),
        "curve": [e["test_per_depth"][-1] for e in evals],
    }


# ---------------------------------------------------------------------------- statistics


def ok_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    ok = ("ran", "reused")
    return [r for r in rows if r.get("status") in ok and r.get("test_accuracy") is not None]


def values(rows: Iterable[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def mean_std(xs: list[float]) -> tuple[float, float] | None:
    if not xs:
        return None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pct(xs: list[float], signed: bool = False) -> str:
    """Accuracies (fractions) as 'mean ± std' in percent points; '–' when there are none."""
    ms = mean_std(xs)
    if ms is None:
        return "–"
    m, s = 100 * ms[0], 100 * ms[1]
    body = f"{m:+.2f}" if signed else f"{m:.2f}"
    return body + (f" ± {s:.2f}" if len(xs) > 1 else "")


def secs(xs: list[float]) -> str:
    ms = mean_std(xs)
    return "–" if ms is None else f"{ms[0]:.1f}"


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> list[float]:
    """Per-seed differences a - b on `key` (seeds present in both)."""
    bs = {r["seed"]: r[key] for r in b if r.get(key) is not None}
    return [r[key] - bs[r["seed"]] for r in a if r.get(key) is not None and r["seed"] in bs]


def verdict(diffs: list[float]) -> tuple[float, str]:
    """Mean difference and whether it is above / within / below the noise (seed spread)."""
    m = statistics.fmean(diffs)
    tol = max(TOL, statistics.stdev(diffs) if len(diffs) > 1 else 0.0)
    return m, ("above" if m > tol else "below" if m < -tol else "level with")


def by(rows: Iterable[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[tuple(r.get(k) for k in keys)].append(r)
    return out


def table(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- provenance


def machine() -> dict[str, str]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "processor": (platform.processor() or platform.machine()) + (f", GPU {gpu}" if gpu else ""),
        "cpus": str(os.cpu_count()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "label": f"{platform.machine()}-{os.cpu_count()}cpu",
    }


def invocation_lines(meta: dict[str, Any], study: str) -> list[str]:
    """Command, seeds, epochs, machine and date of one invocation of this script."""
    m, k = meta["machine"], meta["knobs"]
    epochs = k["epochs"] or STUDY_EPOCHS.get(study, "per study")
    setting = f"- seeds: {k['seeds']}; epochs: {epochs}; batch size {k['batch_size']}"
    setting += f", validation fraction {k['val_fraction']}"
    if k["subset"]:
        setting += f", training subset {k['subset']}"
    if meta["extra"]:
        setting += f"; overrides for every run: `{' '.join(meta['extra'])}`"
    host = f"- machine: {m['platform']}, {m['processor']}, {m['cpus']} CPUs, torch {m['torch']}"
    host += f", {k['threads']} thread(s) per run, {k['jobs']} run(s) at a time"
    return [f"- command: `{meta['command']}`", setting, host, f"- date: {meta['date']}"]


def provenance(metas: list[dict[str, Any]], study: str) -> str:
    """The lines every table starts with; one block per invocation whose runs it shows."""
    if len(metas) == 1:
        return "\n".join(invocation_lines(metas[0], study))
    blocks = []
    for n, meta in enumerate(metas, 1):
        lines = invocation_lines(meta, study)
        blocks.append("\n".join([f"- run set {n}: {lines[0][2:]}", *("  " + x for x in lines[1:])]))
    return "\n".join(blocks)


def status_lines(rows: list[dict[str, Any]]) -> str:
    counts = defaultdict(int)
    for r in rows:
        counts[r.get("status", "?")] += 1
    lines = ["Runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "."]
    for r in rows:
        if r.get("status") in ("skipped", "failed"):
            lines.append(f"- {r['status']}: `{r['name']}`: {r['reason']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_depth_group(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    curves = [r["per_depth_accuracy"] for r in rows if r.get("per_depth_accuracy")]
    single = len(curves) == 1
    for r in rows:
        d = r.get("per_depth_accuracy") or []
        ax.plot(
            range(1, len(d) + 1),
            [100 * x for x in d],
            "-o" if single else "-",
            alpha=1.0 if single else 0.4,
            lw=2 if single else 1,
            label=f"seed {r['seed']}",
        )
    if len(curves) > 1 and len({len(c) for c in curves}) == 1:
        mean = [100 * statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
        ax.plot(range(1, len(mean) + 1), mean, "k-o", lw=2, label="mean")
    ax.set_xlabel("depth (module)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lines(
    series: dict[str, tuple[list[float], list[list[float]]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str,
    hlines: dict[str, list[float]] | None = None,
    scale: float = 100.0,
) -> None:
    """One line per series: x values and, per x, the per-seed values (mean, std error bar)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ms = [mean_std(y) or (math.nan, 0.0) for y in ys]
        ax.errorbar(
            xs,
            [scale * m for m, _ in ms],
            yerr=[scale * s for _, s in ms],
            marker="o",
            capsize=3,
            label=label,
        )
    for label, ys in (hlines or {}).items():
        if ys:
            ax.axhline(scale * statistics.fmean(ys), ls="--", lw=1, color="gray")
            ax.annotate(
                label,
                (0.01, scale * statistics.fmean(ys)),
                fontsize=7,
                xycoords=("axes fraction", "data"),
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- reports


@dataclass
class Report:
    markdown: str
    findings: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


def runs_cell(rows: list[dict[str, Any]]) -> str:
    """'3 × 10' (seeds × epochs), with the training subset when there was one."""
    kinds = sorted({(r.get("epochs"), r.get("subset")) for r in rows}, key=str)
    cells = [f"{e}" + (f" (subset {n})" if n else "") for e, n in kinds]
    return f"{len(rows)} × {'/'.join(cells)}"


def metric_cols(rows: list[dict[str, Any]]) -> list[str]:
    return [pct(values(rows, key)) for _, key, _ in METRICS]


def report_reference(rows: list[dict[str, Any]], metas: list[dict[str, Any]], out: Path) -> Report:
    good = ok_rows(rows)
    body, findings = [], []
    for (data,), grp in sorted(by(good, "dataset").items()):
        sid = [r for r in grp if r["method"] == "sid"]
        bp = [r for r in grp if r["method"] == "bp"]
        for method, rs in (("bp", bp), ("sid", sid)):
            paper = PAPER_REFERENCE[method] if data == "mnist" else None
            body.append(
                [
                    data,
                    "SID (shared)" if method == "sid" else "BP",
                    *metric_cols(rs),
                    f"{100 * paper:.2f}" if paper else "–",
                    secs(values(rs, "s_per_epoch")),
                    runs_cell(rs),
                ]
            )
        for _, key, label in METRICS:
            diffs = paired(sid, bp, key)
            if not diffs:
                continue
            m, v = verdict(diffs)
            line = (
                f"Reference ({data}), {label} test accuracy: SID {pct(values(sid, key))} vs BP "
                f"{pct(values(bp, key))}; SID − BP = {100 * m:+.2f} points over {len(diffs)} "
                f"seed(s): SID is {v} BP"
            )
            if data == "mnist" and key == "best_epoch_test_accuracy":
                line += " (paper: 99.31 vs 99.06, +0.25)"
            if v == "below":
                line += ". This contradicts the paper's claim that SID matches or beats BP"
            findings.append(line + ".")
    md = [
        "## Study 1: reference reproduction (`sid.variant=shared` vs BP)",
        "",
        "`experiment=mnist_reference`: shared SimpleCNN extractor + 5 belief modules "
        "(BP: the same chain trained end to end on the last module), Adam 1e-3. "
        "Accuracies in %, mean ± std over seeds. *Best epoch* is chosen on the test set "
        "(as the paper's log); *val-selected* picks the epoch with the best held-out "
        "validation accuracy.",
        "",
        provenance(metas, "reference"),
        "",
        table(
            [
                "data",
                "method",
                "last epoch",
                "best epoch",
                "val-selected",
                "paper (best)",
                "s/epoch",
                "seeds × epochs",
            ],
            body,
        ),
        "",
        status_lines(rows),
    ]
    plots = []
    curves = {
        f"{r['dataset']} {r['method']} s{r['seed']}": r["curve"] for r in good if r.get("curve")
    }
    if curves:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, c in curves.items():
            ax.plot(range(1, len(c) + 1), [100 * x for x in c], marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("reference: test accuracy per epoch", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "plots" / "reference" / "curves.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots.append(str(path.relative_to(out)))
        md += ["", f"![test accuracy per epoch]({plots[-1]})"]
    return Report("\n".join(md), findings, plots)


def report_blockwise(rows: list[dict[str, Any]], metas: list[dict[str, Any]], out: Path) -> Report:
    good = ok_rows(rows)
    body, findings, plots = [], [], []
    settings = 0
    level_or_above = 0
    gap_series: dict[str, dict[str, tuple[list[float], list[list[float]]]]] = defaultdict(dict)
    for (data, model), grp in sorted(by(good, "dataset", "model").items()):
        bp = [r for r in grp if r["method"] == "bp"]
        sid_by_blocks = by([r for r in grp if r["method"] == "sid"], "blocks")
        body.append(
            [
                data,
                model,
                "BP",
                *metric_cols(bp),
                "–",
                "–",
                secs(values(bp, "s_per_epoch")),
                runs_cell(bp),
            ]
        )
        xs, ys, parts = [], [], []
        for (blocks,), sid in sorted(sid_by_blocks.items()):
            gaps = {k: paired(sid, bp, key) for k, key, _ in METRICS}
            body.append(
                [
                    data,
                    model,
                    f"SID {blocks} blocks",
                    *metric_cols(sid),
                    pct(gaps["last"], signed=True),
                    pct(gaps["val"], signed=True),
                    secs(values(sid, "s_per_epoch")),
                    runs_cell(sid),
                ]
            )
            if gaps["last"]:
                xs.append(blocks)
                ys.append(gaps["last"])
                m, v = verdict(gaps["last"])
                settings += 1
                level_or_above += v != "below"
                parts.append(f"{100 * m:+.2f} at {blocks} blocks ({v} BP)")
        if xs:
            gap_series[data][model] = (xs, ys)
            means = [statistics.fmean(y) for y in ys]
            trend = ""
            if len(means) > 1:
                if all(b < a for a, b in zip(means, means[1:])):
                    trend = "; SID falls further behind BP as the network is cut finer"
                elif all(b > a for a, b in zip(means, means[1:])):
                    trend = "; SID gains on BP as the network is cut finer"
                else:
                    trend = "; no monotone trend with the number of blocks"
            findings.append(
                f"Blockwise {model} on {data}: SID − BP (last-epoch test accuracy) "
                + ", ".join(parts)
                + trend
                + "."
            )
    if settings:
        line = (
            f"Blockwise SID is level with or above BP (last epoch, within max(0.1 point, seed "
            f"std)) in {level_or_above} of {settings} (dataset, model, blocks) settings"
        )
        if level_or_above < settings:
            line += (
                f"; in the other {settings - level_or_above} it is below BP, which contradicts "
                "the paper's claim that SID matches or beats BP"
            )
        findings.insert(0, line + ".")
    for data, series in sorted(gap_series.items()):
        path = out / "plots" / "blockwise" / f"gap_vs_blocks_{data}.png"
        plot_lines(
            series,
            path,
            "blocks (SID modules)",
            "SID − BP test accuracy (points)",
            f"{data}: blockwise SID − BP, last epoch (mean ± std over seeds)",
            hlines={"BP": [0.0]},
        )
        plots.append(str(path.relative_to(out)))
    md = [
        "## Study 2: blockwise SID vs BP at equal architecture",
        "",
        "The same blocks and final head; BP trains them end to end (its network does not "
        "depend on the block cut, so one BP run per seed is the baseline of every block "
        f"count). mlp: {MLP_DEPTH} residual layers. Accuracies in %, mean ± std over seeds; "
        "gaps are SID − BP per seed, in points.",
        "",
        provenance(metas, "blockwise"),
        "",
        table(
            [
                "data",
                "model",
                "method",
                "last epoch",
                "best epoch",
                "val-selected",
                "gap (last)",
                "gap (val-sel.)",
                "s/epoch",
                "seeds × epochs",
            ],
            body,
        ),
        "",
        status_lines(rows),
    ]
    md += [""] + [f"![gap vs blocks]({p})" for p in plots]
    return Report("\n".join(md), findings, plots)


def report_noise(rows: list[dict[str, Any]], metas: list[dict[str, Any]], out: Path) -> Report:
    good = ok_rows(rows)
    body, findings, plots = [], [], []
    for (arch, data), grp in sorted(by(good, "arch", "dataset").items()):
        clean = {m: [r for r in grp if r["method"] == m and not r["noise"]] for m in ("bp", "sid")}
        series = {}
        for method in ("bp", "sid"):
            xs, ys = [], []
            for (rate,), rs in sorted(
                by([r for r in grp if r["method"] == method], "noise").items()
            ):
                drop = paired(rs, clean[method], "test_accuracy") if rate else []
                body.append(
                    [
                        arch,
                        data,
                        f"{rate:.0%}",
                        method.upper(),
                        pct(values(rs, "label_noise_rate")),
                        *metric_cols(rs),
                        pct(drop, signed=True) if drop else "–",
                        runs_cell(rs),
                    ]
                )
                xs.append(100 * rate)
                ys.append(values(rs, "test_accuracy"))
            series[method.upper()] = (xs, ys)
        path = out / "plots" / "noise" / f"accuracy_vs_noise_{data}_{arch}.png"
        plot_lines(
            series,
            path,
            "symmetric label noise (%)",
            "clean test accuracy (%)",
            f"{data}, {arch}: last-epoch clean test accuracy",
        )
        plots.append(str(path.relative_to(out)))
        for (rate,), rs in sorted(by(grp, "noise").items()):
            if not rate:
                continue
            sid = [r for r in rs if r["method"] == "sid"]
            bp = [r for r in rs if r["method"] == "bp"]
            for key, label in (
                ("test_accuracy", "last epoch"),
                ("val_selected_test_accuracy", "val-selected"),
            ):
                diffs = paired(sid, bp, key)
                if not diffs:
                    continue
                m, v = verdict(diffs)
                line = (
                    f"Noise {rate:.0%} ({data}, {arch}), {label}: SID {pct(values(sid, key))}"
                    f" vs BP {pct(values(bp, key))} clean test accuracy, SID − BP "
                    f"{100 * m:+.2f} points: SID is {v} BP"
                )
                if v == "below":
                    line += " (this contradicts the paper, which reports SID above BP under noise)"
                if key == "test_accuracy":
                    d_sid = paired(sid, clean["sid"], key)
                    d_bp = paired(bp, clean["bp"], key)
                    if d_sid and d_bp:
                        _, dv = verdict([a - b for a, b in zip(d_sid, d_bp)])
                        line += (
                            f"; drop from clean: SID {100 * statistics.fmean(d_sid):+.2f}, BP "
                            f"{100 * statistics.fmean(d_bp):+.2f} points: "
                        )
                        line += {
                            "above": "SID loses less, as a more robust method should",
                            "level with": "both lose about the same (no robustness advantage)",
                            "below": "SID loses more, which contradicts the paper's robustness "
                            "claim",
                        }[dv]
                findings.append(line + ".")
    md = [
        "## Study 4: symmetric label noise",
        "",
        "Training labels flipped to a uniformly drawn *other* class with the given probability "
        "(realised rate shown); validation (held out before the noise) and test labels are "
        "clean. Accuracies in %, mean ± std over seeds. *drop* = last-epoch accuracy minus the "
        "same method's clean (0%) run, per seed.",
        "",
        provenance(metas, "noise"),
        "",
        table(
            [
                "arch",
                "data",
                "noise",
                "method",
                "realised (%)",
                "last epoch",
                "best epoch",
                "val-selected",
                "drop (last)",
                "seeds × epochs",
            ],
            body,
        ),
        "",
        status_lines(rows),
    ]
    md += [""] + [f"![accuracy vs noise]({p})" for p in plots]
    return Report("\n".join(md), findings, plots)


def report_alpha(rows: list[dict[str, Any]], metas: list[dict[str, Any]], out: Path) -> Report:
    good = ok_rows(rows)
    body, findings, plots = [], [], []
    for (arch, data), grp in sorted(by(good, "arch", "dataset").items()):
        bp = [r for r in grp if r["method"] == "bp"]
        body.append(
            [
                arch,
                data,
                "BP",
                "–",
                *metric_cols(bp),
                "–",
                secs(values(bp, "s_per_epoch")),
                runs_cell(bp),
            ]
        )
        series = {}
        for (kl,), rs in sorted(by([r for r in grp if r["method"] == "sid"], "kl").items()):
            xs, ys, means = [], [], {}
            for (alpha,), ar in sorted(by(rs, "alpha").items()):
                gap = paired(ar, bp, "test_accuracy")
                body.append(
                    [
                        arch,
                        data,
                        f"SID {kl}",
                        f"{alpha:g}",
                        *metric_cols(ar),
                        pct(gap, signed=True) if gap else "–",
                        secs(values(ar, "s_per_epoch")),
                        runs_cell(ar),
                    ]
                )
                xs.append(alpha)
                ys.append(values(ar, "test_accuracy"))
                val = values(ar, "val_selected_test_accuracy") or values(ar, "test_accuracy")
                means[alpha] = statistics.fmean(val)
            series[f"SID {kl} KL"] = (xs, ys)
            if means:
                best = max(means, key=means.get)
                line = (
                    f"alpha ({data}, {arch}, {kl} KL): best alpha {best:g} "
                    f"({100 * means[best]:.2f}% val-selected test accuracy); range over "
                    f"alpha {100 * (max(means.values()) - min(means.values())):.2f} points"
                )
                if 0.5 in means:
                    line += f"; the default 0.5 is {100 * (means[best] - means[0.5]):.2f} below"
                if bp:
                    line += f"; BP {pct(values(bp, 'val_selected_test_accuracy'))}"
                findings.append(line + ".")
        fw = by([r for r in grp if r.get("kl") == "forward"], "alpha", "seed")
        rv = by([r for r in grp if r.get("kl") == "reverse"], "alpha", "seed")
        diffs = [rv[k][0]["test_accuracy"] - fw[k][0]["test_accuracy"] for k in fw if k in rv]
        if diffs:
            m, v = verdict(diffs)
            findings.append(
                f"KL direction ({data}, {arch}): reverse − forward = {100 * m:+.2f} "
                f"points (last epoch, mean over {len(diffs)} alpha×seed pairs): "
                f"reverse is {v} forward."
            )
        path = out / "plots" / "alpha" / f"accuracy_vs_alpha_{data}_{arch}.png"
        plot_lines(
            series,
            path,
            "alpha (weight of the label term)",
            "test accuracy (%)",
            f"{data}, {arch}: last-epoch test accuracy (dashed: BP)",
            hlines={"BP": values(bp, "test_accuracy")},
        )
        plots.append(str(path.relative_to(out)))
    md = [
        "## Study 5: alpha sensitivity and KL direction",
        "",
        "`L_i = alpha·KL(label‖p_i) + (1−alpha)·KL(sg(p_{i−1})‖p_i)` (forward) or with p_i first "
        "(reverse, label term on a clamped/smoothed one-hot). Accuracies in %, mean ± std over "
        "seeds; *gap* = SID − BP last-epoch, in points.",
        "",
        provenance(metas, "alpha"),
        "",
        table(
            [
                "arch",
                "data",
                "method",
                "alpha",
                "last epoch",
                "best epoch",
                "val-selected",
                "gap (last)",
                "s/epoch",
                "seeds × epochs",
            ],
            body,
        ),
        "",
        status_lines(rows),
    ]
    md += [""] + [f"![accuracy vs alpha]({p})" for p in plots]
    return Report("\n".join(md), findings, plots)


REPORTS = {
    "reference": report_reference,
    "blockwise": report_blockwise,
    "noise": report_noise,
    "alpha": report_alpha,
}


def monotone(curve: list[float], tol: float = 0.0) -> bool:
    return all(b >= a - tol for a, b in zip(curve, curve[1:]))


def report_depth(studies: dict[str, dict[str, Any]], meta: dict[str, Any], out: Path) -> Report:
    """Study 3 over every SID run with more than one depth, from all studies present."""
    body, plots = [], []
    runs = total = strict = loose = last_best = 0
    worst: tuple[float, str] | None = None
    for study in STUDIES:
        if study not in studies:
            continue
        good = [r for r in ok_rows(studies[study]["rows"]) if len(r["per_depth_accuracy"]) > 1]
        for (group,), grp in sorted(by(good, "group").items()):
            curves = [r["per_depth_accuracy"] for r in grp]
            n_depth = len(curves[0])
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n_depth)]
            k_strict = sum(monotone(c) for c in curves)
            k_loose = sum(monotone(c, TOL) for c in curves)
            k_last = sum(c[-1] >= max(c) for c in curves)
            total += len(curves)
            strict += k_strict
            loose += k_loose
            last_best += k_last
            runs += 1
            drop = max(mean) - mean[-1]
            if drop > 0 and (worst is None or drop > worst[0]):
                worst = (drop, f"{study}/{group}")
            path = out / "plots" / "depth" / study / f"{group}.png"
            plot_depth_group(grp, path, f"{study}: {group}")
            plots.append(str(path.relative_to(out)))
            body.append(
                [
                    study,
                    f"[`{group}`]({plots[-1]})",
                    " → ".join(f"{100 * x:.1f}" for x in mean),
                    f"{k_strict}/{len(curves)}",
                    f"{k_loose}/{len(curves)}",
                    f"{1 + mean.index(max(mean))}/{n_depth}",
                    f"{100 * (mean[-1] - max(mean)):+.2f}",
                ]
            )
    findings = []
    if total:
        line = (
            f"Depth: test accuracy never falls from one module to the next in {strict} of "
            f"{total} SID runs ({loose} of {total} allowing dips under 0.1 point); the last "
            f"module is the most accurate in {last_best} of {total}"
        )
        if strict < total:
            line += (
                ". The paper's claim that accuracy improves monotonically with depth does not "
                f"hold in {total - strict} run(s)"
            )
            if worst:
                line += f" (largest peak-to-last drop {100 * worst[0]:.2f} points, {worst[1]})"
        findings.append(line + ".")
    sources = "\n".join(
        f"- {s}: `{m['command']}` ({m['date']}, {m['machine']['label']}, seeds "
        f"{m['knobs']['seeds']}, epochs {m['knobs']['epochs'] or STUDY_EPOCHS[s]})"
        for s in STUDIES
        if s in studies
        for m in row_metas(studies[s]["rows"], studies[s].get("invocations", {}))
    )
    md = [
        "## Study 3: accuracy per depth (SID runs of every study)",
        "",
        "Last-epoch test accuracy of every module's belief (%, mean over seeds; each "
        "configuration links its plot, one line per seed). *monotone* counts seeds whose "
        "accuracy never decreases with depth (strictly, or allowing dips under 0.1 point); "
        "*peak* is the most accurate depth; *last − peak* in points.",
        "",
        provenance([meta], "depth"),
        "",
        "Runs taken from:",
        sources or "- (no study results found)",
        "",
        table(
            [
                "study",
                "configuration",
                "accuracy by depth (%)",
                "monotone",
                "monotone ±0.1",
                "peak",
                "last − peak",
            ],
            body,
        ),
    ]
    return Report("\n".join(md), findings, plots)


# ---------------------------------------------------------------------------- merging

ID_KEYS = ("dataset", "arch", "model", "blocks", "method", "variant", "noise", "alpha", "kl")


def identity(row: dict[str, Any]) -> tuple:
    """What a run measures, seed and settings aside."""
    return tuple(row.get(k) for k in ID_KEYS)


def merge(old: dict[str, Any] | None, new: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """This invocation's rows plus the finished rows of earlier invocations that it does not
    supersede: another configuration (e.g. other models), or more seeds of the very same
    settings (same group). An earlier row of the same configuration with other settings
    (epochs, subset, overrides) is dropped: the newest invocation wins."""
    if not old:
        return new
    names = {r["name"] for r in new}
    ids = {identity(r) for r in new}
    groups = {r["group"] for r in new}
    kept = [
        {**r, "status": "reused", "reason": "from an earlier invocation"}
        for r in old["rows"]
        if r.get("status") in ("ran", "reused")
        and r["name"] not in names
        and (r["group"] in groups or identity(r) not in ids)
        and (out / r["run_dir"] / "summary.json").is_file()
    ]
    return new + kept


def row_metas(rows: list[dict[str, Any]], invocations: dict[str, Any]) -> list[dict[str, Any]]:
    keys = sorted({r["invocation"] for r in rows if r.get("invocation") in invocations})
    return [invocations[k] for k in keys]


# ---------------------------------------------------------------------------- estimate


def cost_key(run: Run) -> tuple:
    """Runs that cost the same per epoch (seed, alpha, noise and KL direction aside)."""
    lab = run.labels
    return (lab["dataset"], lab.get("arch") or lab["model"], lab.get("blocks"), lab["method"])


def estimate(plans: dict[str, list[Run]], out: Path, steps: int, meta: dict[str, Any]) -> str:
    """Time `steps` training batches of each distinct kind of run; project the plan's cost.

    Training time only: the per-epoch evaluation of the test and validation splits (forward
    passes of 16k samples on MNIST) adds roughly 10-20 % on top.
    """
    from hydra import compose, initialize_config_dir

    from sidpipe.data import load_data
    from sidpipe.train import CONF_DIR, to_config

    probes: dict[tuple, Run] = {}
    for runs in plans.values():
        for r in runs:
            if not r.skip_reason:
                probes.setdefault(cost_key(r), r)
    rate: dict[tuple, float] = {}
    n_train: dict[tuple, int] = {}
    for k, (key, r) in enumerate(sorted(probes.items(), key=lambda kv: str(kv[0])), 1):
        probe = Run(
            r.study,
            r.name,
            r.labels,
            [
                *r.overrides,
                f"train.max_steps={steps}",
                "train.eval_every_epoch=false",
                "train.final_eval=false",
            ],
            None,
            r.epochs,
        )
        log.info("[%d/%d] estimate: %d steps of %s", k, len(probes), steps, r.name)
        try:
            summary = execute(probe, str(out / "estimate" / r.name))
        except Exception as e:  # noqa: BLE001
            log.error("estimate of %s failed: %s", r.name, e)
            continue
        rate[key] = summary["samples_per_s"]
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = to_config(compose(config_name="config", overrides=train_overrides(r)))
        n_train[key] = len(load_data(cfg.data, cfg.seed).train)
    body, grand = [], 0.0
    for study, runs in plans.items():
        per_key: dict[tuple, list[Run]] = defaultdict(list)
        for r in runs:
            if not r.skip_reason:
                per_key[cost_key(r)].append(r)
        total = 0.0
        for key, rs in sorted(per_key.items(), key=lambda kv: str(kv[0])):
            if key not in rate:
                body.append(
                    [
                        study,
                        " ".join(str(x) for x in key if x is not None),
                        len(rs),
                        "failed",
                        "–",
                        "–",
                    ]
                )
                continue
            epoch_s = n_train[key] / rate[key]
            cost = sum(r.epochs for r in rs) * epoch_s
            total += cost
            body.append(
                [
                    study,
                    " ".join(str(x) for x in key if x is not None),
                    len(rs),
                    f"{rate[key]:.0f}",
                    f"{epoch_s:.0f}",
                    f"{cost / 3600:.2f}",
                ]
            )
        body.append([f"**{study}**", "**total**", len(runs), "", "", f"**{total / 3600:.2f}**"])
        grand += total
    md = "\n".join(
        [
            "## Estimated cost (training time only; evaluation adds about 10-20 %)",
            "",
            provenance([meta], "estimate"),
            f"- measured: {steps} training batches per kind of run (first batch included)",
            "",
            table(
                [
                    "study",
                    "kind of run (data, arch/model, blocks, method)",
                    "runs",
                    "samples/s",
                    "s/epoch",
                    "hours (all its runs)",
                ],
                body,
            ),
            "",
            f"All planned runs: about {grand / 3600:.1f} hours at 1 run at a time.",
        ]
    )
    write(out / "estimate.md", md + "\n")
    return md


# ---------------------------------------------------------------------------- driver


def default_out() -> Path:
    m = machine()["label"]
    return REPO / "benchmarks" / "results" / f"accuracy-{m}-{dt.date.today().isoformat()}"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_studies(out: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for study in STUDIES:
        p = out / f"{study}.json"
        if p.is_file():
            found[study] = json.loads(p.read_text())
    return found


def write_summary(out: Path, meta: dict[str, Any]) -> Path:
    studies = load_studies(out)
    depth = report_depth(studies, meta, out)
    write(out / "depth.md", depth.markdown + "\n")
    write(
        out / "depth.json",
        json.dumps({"meta": meta, "findings": depth.findings, "plots": depth.plots}, indent=1),
    )
    order = [("reference", 1), ("blockwise", 2), ("depth", 3), ("noise", 4), ("alpha", 5)]
    findings, sections = [], []
    for study, _ in order:
        if study == "depth":
            if depth.findings or studies:
                findings += depth.findings
                sections.append(depth.markdown)
            continue
        if study in studies:
            findings += studies[study]["findings"]
            sections.append((out / f"{study}.md").read_text().strip())
    md = [
        "# SID accuracy studies: summary",
        "",
        "Findings (computed from the tables below; 'level with' = within max(0.1 point, the "
        "seed spread of the paired difference)):",
        "",
        *[f"- {f}" for f in findings or ["(no results yet)"]],
        "",
        *[s + "\n" for s in sections],
    ]
    path = out / "summary.md"
    write(path, "\n".join(md))
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        knobs, extra = parse_args(argv)
    except UsageError as e:
        print(f"accuracy: error: {e}", file=sys.stderr)
        return 2
    out = Path(knobs["out"]) if knobs["out"] else default_out()
    script = os.path.relpath(Path(__file__).resolve(), Path.cwd())
    date = dt.datetime.now().isoformat(timespec="seconds")
    meta = {
        "id": f"{date} {os.getpid()}",
        "command": shlex.join(["python", script, *argv]),
        "date": date,
        "machine": machine(),
        "knobs": knobs,
        "extra": extra,
        "data_root": str(DATA),
    }
    studies = list(STUDIES) if knobs["study"] == "all" else [knobs["study"]]
    studies = [s for s in studies if s != "depth"]
    try:
        plans = {s: PLANS[s](knobs, extra) for s in studies}
    except UsageError as e:
        print(f"accuracy: error: {e}", file=sys.stderr)
        return 2
    if knobs["plan"]:
        for s, runs in plans.items():
            print(f"# {s}: {len(runs)} runs")
            for r in runs:
                what = f"SKIP {r.skip_reason}" if r.skip_reason else " ".join(r.overrides)
                print(f"{r.name}: {what}")
        return 0
    if knobs["estimate"]:
        print(estimate(plans, out, knobs["estimate_steps"], meta), flush=True)
        return 0
    failed = 0
    for study, runs in plans.items():
        log.info("study %s: %d runs into %s", study, len(runs), out)
        rows = run_all(runs, out, knobs["jobs"], meta)
        failed += sum(r["status"] == "failed" for r in rows)
        old = load_studies(out).get(study)
        rows = merge(old, rows, out)
        invocations = {**(old or {}).get("invocations", {}), meta["id"]: meta}
        invocations = {
            k: v for k, v in invocations.items() if k in {r.get("invocation") for r in rows}
        }
        report = REPORTS[study](rows, row_metas(rows, invocations), out)
        write(out / f"{study}.md", report.markdown + "\n")
        write(
            out / f"{study}.json",
            json.dumps(
                {
                    "meta": meta,
                    "invocations": invocations,
                    "rows": rows,
                    "findings": report.findings,
                    "plots": report.plots,
                    "runs": [asdict(r) for r in runs],
                },
                indent=1,
                default=str,
            ),
        )
        for f in report.findings:
            log.info("finding: %s", f)
    summary = write_summary(out, meta)
    print(f"results: {out}\nsummary: {summary}", flush=True)
    if failed:
        print(f"accuracy: {failed} run(s) failed (see the tables)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
