"""Accuracy studies of SID against backprop: does the paper's story hold?

    sidpipe accuracy study.name=reference|blockwise|depth|noise|alpha|all [study.*=...]
                     [train overrides ...]
    python -m sidpipe.bench.accuracy ...   (the same)

The command line is the config of `sidpipe train` (conf/, sidpipe/config.py) plus the `study.*`
keys (StudyConfig). Every other override means what it means to `sidpipe train` and applies to
every run of the study (e.g. `optim.lr=3e-4 model.width=512 data.root=../shared/data`); keys
the study sets itself for each run (seed, data, model, method, train.epochs, ...) are refused
with the `study.*` key to use instead. Everything is checked before any training.

Studies (each run single-process, `pipeline.stages=1`, trained in this process or in
`study.jobs` worker processes):

  reference  the reference setting (`experiment=mnist_reference`: shared SimpleCNN extractor,
             5 belief modules, Adam 1e-3, batch 256, 20 epochs, MNIST): `sid.variant=shared`
             vs BP on the same chain. The authors' log reports best-epoch BP 99.06 vs SID 99.31.
  blockwise  blockwise SID vs BP at equal architecture for study.models x study.datasets x
             study.blocks (x study.heads). BP does not depend on how the layers are grouped:
             it runs once per (dataset, model, seed) and is the baseline of every block count.

Every BP run of every study takes the whole batch as one microbatch
(`pipeline.microbatches=1`): BatchNorm then normalises over the same samples as in SID, and a
plan where a BP run would split its batch is refused.
  depth      per-depth test accuracy of every SID run found in the output folder (all studies):
             does accuracy rise with depth? One plot per run configuration. Runs no training;
             every other study refreshes it.
  noise      symmetric label noise on the training labels (study.noise rates), SID vs BP, clean
             test accuracy (validation labels are held out before the noise: they stay clean).
  alpha      SID with study.alphas x study.kl directions, and the BP baseline of the same
             architecture.
  all        the four training studies, then depth.

study.* keys (lists as `[a,b]`):
  study.seeds=[0,1,2]  study.epochs=N (default per study: reference 20, others 10)
  study.batch_size=256  study.val_fraction=0.1  study.subset=N (first N training samples)
  study.datasets=[...] (default: blockwise [mnist,fashion_mnist], the others [mnist])
  study.models=[mlp,simplecnn,vgg11,resnet18]  study.blocks=[2,4,8]
  study.methods=[sid] (blockwise: sid, greedy)  study.heads=[pool] (blockwise: the belief
      heads, model.head, every local method runs with; BP keeps the default head)
  study.baseline=true (blockwise: train the BP baseline; false: the local methods only)
  study.noise=[0.0,0.2,0.4]  study.alphas=[0.1,0.3,0.5,0.7,0.9]  study.kl=[forward,reverse]
  study.arch=[shared] (noise/alpha: `shared` = the reference setting, `<model>-b<blocks>` =
      blockwise, e.g. study.arch=[shared,simplecnn-b4])
  study.threads=1 (torch threads per run)  study.jobs=1 (runs in parallel worker processes)
  study.out=DIR (default benchmarks/results/accuracy-<machine>-<date> in the current directory)
  study.plan=true (list the runs only)
  study.estimate=true (time study.estimate_steps=6 batches of each kind of run, project hours)
  study.tiny=true (CI: digits, 1 epoch, seed 0, mlp, blocks [2,4], few alphas/noise rates)

A run whose folder already holds summary.json is not run again (resumable): its row says so.
Outputs in study.out: <study>.json (all rows), <study>.md (tables, each headed by the command,
seeds, epochs, machine and date), plots/<study>/*.png, depth.md, and summary.md (all tables
plus one-line findings computed from the numbers).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from sidpipe.bench.accuracy.plan import (
    TINY,
    is_study_key,
    override_key,
    plan,
    plan_lines,
    tiny_overrides,
    validate,
)
from sidpipe.bench.accuracy.report import (
    default_out,
    estimate_markdown,
    load_studies,
    machine,
    write_studies_summary,
    write_study,
    write_text,
)
from sidpipe.bench.accuracy.run import measure, merge, merged_invocations, run_all
from sidpipe.config import Config, StudyConfig, compose_config
from sidpipe.data import resolve_root
from sidpipe.errors import ConfigError, SidpipeError
from sidpipe.runtime.lock import exclusive

__all__ = ["main"]

log = logging.getLogger("sidpipe.accuracy")
STUDY_KEYS = {f.name: f for f in dataclasses.fields(StudyConfig)}
CONFIG_KEYS = {f.name for f in dataclasses.fields(Config)}


def _check_syntax(argv: list[str]) -> None:
    """One-line errors for the spellings of the old benchmarks/accuracy.py and other slips
    that hydra would report less helpfully."""
    for arg in argv:
        key = override_key(arg)
        if "=" not in arg and not arg.startswith("~"):
            raise ConfigError(f"argument {arg!r} is not key=value, e.g. study.name=blockwise")
        if key == "study":
            raise ConfigError(f"{arg!r}: the study is chosen with study.name=<name>")
        if key in STUDY_KEYS and key not in CONFIG_KEYS:
            raise ConfigError(f"{key}= is a study setting: write study.{arg}")
        if key == "data" and arg.partition("=")[2].startswith("["):
            raise ConfigError(
                f"{arg!r}: data= is the dataset of one run, as in sidpipe train; "
                "the study's datasets are study.datasets=[...]"
            )


def _explain(e: ConfigError) -> ConfigError:
    """hydra's 'Error merging override study.seeds=0: ...': also say what the key takes."""
    prefix = "Error merging override study."
    msg = str(e)
    if msg.startswith(prefix):
        key = msg[len(prefix) :].split("=", 1)[0]
        if key in STUDY_KEYS:
            value = getattr(StudyConfig(), key)
            value = TINY.get(key) if value is None else value
            hint = f"study.{key} takes {STUDY_KEYS[key].type}"
            if value is not None:
                hint += f", e.g. study.{key}=" + str(value).replace(" ", "").replace("'", "")
            return ConfigError(f"{msg}: {hint}")
    return e


def parse(argv: list[str]) -> tuple[Config, list[str]]:
    """The validated config (its `study` is the StudyConfig) and the train overrides."""
    _check_syntax(argv)
    try:
        cfg = compose_config(argv)
        if cfg.study.tiny:  # the tiny values first: the command line's own still win
            cfg = compose_config([*tiny_overrides(), *argv])
    except ConfigError as e:
        raise _explain(e) from None
    return cfg, [a for a in argv if not is_study_key(a)]


def main(argv: list[str] | None = None) -> int:
    """`sidpipe accuracy [overrides]`: 0 on success, 1 when a run failed, 2 on a usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg, extra = parse(argv)
        s = cfg.study
        plans = plan(s, extra)
        validate(plans)
    except SidpipeError as e:
        print(f"sidpipe: error: {e}", file=sys.stderr, flush=True)
        return 2
    if s.plan:
        print("\n".join(plan_lines(plans)), flush=True)
        return 0
    try:
        return run_studies(cfg, extra, plans, argv)
    except SidpipeError as e:
        print(f"sidpipe: error: {e}", file=sys.stderr, flush=True)
        return 1


def run_studies(cfg: Config, extra: list[str], plans: dict, argv: list[str]) -> int:
    s = cfg.study
    out = Path(s.out) if s.out else default_out(machine()["label"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"study.out={out} is a file; give a directory")
    with exclusive(out, "study"):  # two studies writing one directory would mix their tables
        return _run_studies(cfg, extra, plans, argv, out)


def _run_studies(cfg: Config, extra: list[str], plans: dict, argv: list[str], out: Path) -> int:
    s = cfg.study
    host = machine()
    date = dt.datetime.now().isoformat(timespec="seconds")
    meta: dict[str, Any] = {
        "id": f"{date} {os.getpid()}",
        "command": shlex.join(["sidpipe", "accuracy", *argv]),
        "date": date,
        "machine": host,
        "knobs": dataclasses.asdict(s),
        "extra": extra,
        "data_root": str(resolve_root(cfg.data.root)),
    }
    if s.estimate:
        rate, n_train = measure(plans, out, s.estimate_steps)
        md = estimate_markdown(plans, rate, n_train, s.estimate_steps, meta)
        write_text(out / "estimate.md", md + "\n")
        print(md, flush=True)
        return 0
    failed = 0
    for study, runs in plans.items():
        log.info("study %s: %d runs into %s", study, len(runs), out)
        rows = run_all(runs, out, s.jobs, meta)
        failed += sum(r["status"] == "failed" for r in rows)
        old = load_studies(out).get(study)
        rows = merge(old, rows, out)
        report = write_study(out, study, rows, merged_invocations(old, rows, meta), meta, runs)
        for f in report.findings:
            log.info("finding: %s", f)
    summary = write_studies_summary(out, meta)
    print(f"results: {out}\nsummary: {summary}", flush=True)
    if failed:
        print(f"sidpipe: error: {failed} run(s) failed (see the tables in {out})", file=sys.stderr)
        return 1
    return 0
