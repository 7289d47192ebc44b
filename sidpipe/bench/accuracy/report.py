"""Markdown reports of the studies: <study>.md (tables headed by their provenance: command,
seeds, epochs, machine, date), depth.md, summary.md (all tables and the findings), the plots
they show, and estimate.md."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sidpipe.bench.accuracy import stats
from sidpipe.bench.accuracy.plan import MLP_DEPTH, STUDIES, STUDY_EPOCHS, Run, cost_key
from sidpipe.bench.accuracy.plots import plot_curves, plot_depth_group, plot_lines
from sidpipe.bench.accuracy.stats import Row, ok_rows, table
from sidpipe.runtime.io import atomic_write_json

# ---------------------------------------------------------------------------- provenance


def machine() -> dict[str, str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "processor": (platform.processor() or platform.machine()) + (f", GPU {gpu}" if gpu else ""),
        "cpus": str(os.cpu_count()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "label": f"{platform.machine()}-{os.cpu_count()}cpu",
    }


def default_out(label: str) -> Path:
    """benchmarks/results/accuracy-<machine>-<date> in the current directory (never inside the
    installed package)."""
    return Path("benchmarks") / "results" / f"accuracy-{label}-{dt.date.today().isoformat()}"


def invocation_lines(meta: dict[str, Any], study: str) -> list[str]:
    """Command, seeds, epochs, machine and date of one invocation."""
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


def row_metas(rows: list[Row], invocations: dict[str, Any]) -> list[dict[str, Any]]:
    keys = sorted({r["invocation"] for r in rows if r.get("invocation") in invocations})
    return [invocations[k] for k in keys]


def status_lines(rows: list[Row]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    lines = ["Runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "."]
    for r in rows:
        if r.get("status") in ("skipped", "failed"):
            lines.append(f"- {r['status']}: `{r['name']}`: {r['reason']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- reports


@dataclass
class Report:
    markdown: str
    findings: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


def section(
    title: str, intro: str, head: str, header: list[str], body: list, rows: list[Row]
) -> list[str]:
    return [title, "", intro, "", head, "", table(header, body), "", status_lines(rows)]


def report_reference(rows: list[Row], metas: list[dict[str, Any]], out: Path) -> Report:
    good = ok_rows(rows)
    body, findings = stats.reference_stats(good)
    md = section(
        "## Study 1: reference reproduction (`sid.variant=shared` vs BP)",
        "`experiment=mnist_reference`: shared SimpleCNN extractor + 5 belief modules "
        "(BP: the same chain trained end to end on the last module), Adam 1e-3. "
        "Accuracies in %, mean ± std over seeds. *Best epoch* is chosen on the test set "
        "(as the paper's log); *val-selected* picks the epoch with the best held-out "
        "validation accuracy.",
        provenance(metas, "reference"),
        ["data", "method", "last epoch", "best epoch", "val-selected", "paper (best)",
         "s/epoch", "seeds × epochs"],
        body,
        rows,
    )  # fmt: skip
    plots = []
    curves = {
        f"{r['dataset']} {r['method']} s{r['seed']}": r["curve"] for r in good if r.get("curve")
    }
    if curves:
        path = out / "plots" / "reference" / "curves.png"
        plot_curves(curves, path, "reference: test accuracy per epoch")
        plots.append(str(path.relative_to(out)))
        md += ["", f"![test accuracy per epoch]({plots[-1]})"]
    return Report("\n".join(md), findings, plots)


def report_blockwise(rows: list[Row], metas: list[dict[str, Any]], out: Path) -> Report:
    good = ok_rows(rows)
    body, findings, gap_series = stats.blockwise_stats(good)
    plots = []
    for data, series in sorted(gap_series.items()):
        path = out / "plots" / "blockwise" / f"gap_vs_blocks_{data}.png"
        plot_lines(series, path, "blocks (local modules)", "local − BP test accuracy (points)",
                   f"{data}: local learning − BP, last epoch (mean ± std over seeds)",
                   hlines={"BP": [0.0]})  # fmt: skip
        plots.append(str(path.relative_to(out)))
    md = section(
        "## Study 2: blockwise SID vs BP at equal architecture",
        "The same blocks and final head; BP trains them end to end (its network does not "
        "depend on the block cut, so one BP run per seed is the baseline of every block "
        f"count). mlp: {MLP_DEPTH} residual layers. *greedy (α=1)* is SID with the label term "
        "only (each module trained alone on the labels, the greedy/DGL-style control): SID − "
        "greedy is what the belief-consistency term adds. The model column gives the "
        "model.width of its runs (the same for every method; none: the architecture's "
        "standard). Where a study ran several belief heads (study.heads, model.head) the "
        "method names its head; BP always runs the default (pool) head. Accuracies in %, "
        "mean ± std over seeds; gaps are local − BP per seed, in points.",
        provenance(metas, "blockwise"),
        ["data", "model", "method", "last epoch", "best epoch", "val-selected", "gap (last)",
         "gap (val-sel.)", "s/epoch", "seeds × epochs"],
        body,
        rows,
    )  # fmt: skip
    header, diffs = stats.paired_table(good)
    if diffs:
        md += [
            "",
            "### Paired differences per cell",
            "",
            "Each difference is taken per seed (the two runs share data order, augmentation "
            "and initialisation seed, and the data split), then summarised as mean ± std over "
            "seeds, in points, for validation-selected and last-epoch test accuracy; the last "
            "column lists the per-seed values. A cell's 3 seeds are its only evidence: cells "
            "share seeds and the split, so pooling them does not add independent pairs.",
            "",
            table(header, diffs),
        ]
    header, anchors = stats.anchor_table(good)
    if any(r[0].startswith("cifar") for r in anchors):
        md += [
            "",
            "### Against published local learning",
            "",
            "Validation-selected test accuracy minus BP's, in points, per block count; the "
            f"published gaps are from {stats.PUBLISHED_SOURCE}, a different network and the "
            "full training set, so they are anchors, not a like-for-like comparison.",
            "",
            table(header, [r for r in anchors if r[0].startswith("cifar")]),
        ]
    md += [""] + [f"![gap vs blocks]({p})" for p in plots]
    return Report("\n".join(md), findings, plots)


def report_noise(rows: list[Row], metas: list[dict[str, Any]], out: Path) -> Report:
    body, findings, series_of = stats.noise_stats(ok_rows(rows))
    plots = []
    for (arch, data), series in series_of.items():
        path = out / "plots" / "noise" / f"accuracy_vs_noise_{data}_{arch}.png"
        plot_lines(series, path, "symmetric label noise (%)", "clean test accuracy (%)",
                   f"{data}, {arch}: last-epoch clean test accuracy")  # fmt: skip
        plots.append(str(path.relative_to(out)))
    md = section(
        "## Study 4: symmetric label noise",
        "Training labels flipped to a uniformly drawn *other* class with the given probability "
        "(realised rate shown); validation (held out before the noise) and test labels are "
        "clean. Accuracies in %, mean ± std over seeds. *drop* = last-epoch accuracy minus the "
        "same method's clean (0%) run, per seed.",
        provenance(metas, "noise"),
        ["arch", "data", "noise", "method", "realised (%)", "last epoch", "best epoch",
         "val-selected", "drop (last)", "seeds × epochs"],
        body,
        rows,
    )  # fmt: skip
    md += [""] + [f"![accuracy vs noise]({p})" for p in plots]
    return Report("\n".join(md), findings, plots)


def report_alpha(rows: list[Row], metas: list[dict[str, Any]], out: Path) -> Report:
    body, findings, series_of = stats.alpha_stats(ok_rows(rows))
    plots = []
    for (arch, data), (series, bp) in series_of.items():
        path = out / "plots" / "alpha" / f"accuracy_vs_alpha_{data}_{arch}.png"
        plot_lines(series, path, "alpha (weight of the label term)", "test accuracy (%)",
                   f"{data}, {arch}: last-epoch test accuracy (dashed: BP)",
                   hlines={"BP": bp})  # fmt: skip
        plots.append(str(path.relative_to(out)))
    md = section(
        "## Study 5: alpha sensitivity and KL direction",
        "`L_i = alpha·KL(label‖p_i) + (1−alpha)·KL(sg(p_{i−1})‖p_i)` (forward) or with p_i first "
        "(reverse, label term on a clamped/smoothed one-hot). Accuracies in %, mean ± std over "
        "seeds; *gap* = SID − BP last-epoch, in points.",
        provenance(metas, "alpha"),
        ["arch", "data", "method", "alpha", "last epoch", "best epoch", "val-selected",
         "gap (last)", "s/epoch", "seeds × epochs"],
        body,
        rows,
    )  # fmt: skip
    md += [""] + [f"![accuracy vs alpha]({p})" for p in plots]
    return Report("\n".join(md), findings, plots)


REPORTS = {
    "reference": report_reference,
    "blockwise": report_blockwise,
    "noise": report_noise,
    "alpha": report_alpha,
}


def report_depth(studies: dict[str, dict[str, Any]], meta: dict[str, Any], out: Path) -> Report:
    """Study 3 over every SID run with more than one depth, from all studies present."""
    body, findings, groups = stats.depth_stats(studies)
    plots = []
    for study, group, rows in groups:
        plots.append(stats.depth_plot_path(study, group))
        plot_depth_group(rows, out / plots[-1], f"{study}: {group}")
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
        ),  # fmt: skip
    ]
    return Report("\n".join(md), findings, plots)


# ---------------------------------------------------------------------------- files


def write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a crash never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_studies(out: Path) -> dict[str, dict[str, Any]]:
    """<study>.json of every study found in the output folder."""
    found = {}
    for study in STUDIES:
        p = out / f"{study}.json"
        if p.is_file():
            found[study] = json.loads(p.read_text())
    return found


def write_study(
    out: Path, study: str, rows: list[Row], invocations: dict[str, Any], meta: dict[str, Any],
    runs: list[Run],
) -> Report:  # fmt: skip
    """<study>.md and <study>.json (meta, invocations, rows, findings, plots, runs)."""
    report = REPORTS[study](rows, row_metas(rows, invocations), out)
    write_text(out / f"{study}.md", report.markdown + "\n")
    atomic_write_json(out / f"{study}.json", {
        "meta": meta, "invocations": invocations, "rows": rows, "findings": report.findings,
        "plots": report.plots, "runs": [asdict(r) for r in runs],
    })  # fmt: skip
    return report


def write_studies_summary(out: Path, meta: dict[str, Any]) -> Path:
    """depth.md/json from every study present, then summary.md: findings and all tables."""
    studies = load_studies(out)
    depth = report_depth(studies, meta, out)
    write_text(out / "depth.md", depth.markdown + "\n")
    atomic_write_json(
        out / "depth.json", {"meta": meta, "findings": depth.findings, "plots": depth.plots}
    )
    findings, sections = [], []
    for study in ("reference", "blockwise", "depth", "noise", "alpha"):  # study 1 .. 5
        if study == "depth":
            if depth.findings or studies:
                findings += depth.findings
                sections.append(depth.markdown)
        elif study in studies:
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
    write_text(path, "\n".join(md))
    return path


def estimate_markdown(
    plans: dict[str, list[Run]],
    rate: dict[tuple, float],
    n_train: dict[tuple, int],
    steps: int,
    meta: dict[str, Any],
) -> str:
    """The plan's projected training time from the measured samples/s of each kind of run."""
    body, grand = [], 0.0
    for study, runs in plans.items():
        per_key: dict[tuple, list[Run]] = {}
        for r in runs:
            if not r.skip_reason:
                per_key.setdefault(cost_key(r), []).append(r)
        total = 0.0
        for key, rs in sorted(per_key.items(), key=lambda kv: str(kv[0])):
            kind = " ".join(str(x) for x in key if x is not None)
            if key not in rate:
                body.append([study, kind, len(rs), "failed", "–", "–"])
                continue
            epoch_s = n_train[key] / rate[key]
            cost = sum(r.epochs for r in rs) * epoch_s
            total += cost
            body.append(
                [study, kind, len(rs), f"{rate[key]:.0f}", f"{epoch_s:.1f}", f"{cost / 3600:.2f}"]
            )
        body.append([f"**{study}**", "**total**", len(runs), "", "", f"**{total / 3600:.2f}**"])
        grand += total
    return "\n".join([
        "## Estimated cost (training time only; evaluation adds about 10-20 %)",
        "",
        provenance([meta], "estimate"),
        f"- measured: {steps} training batches per kind of run (first batch included)",
        "",
        table(["study", "kind of run (data, arch/model, blocks, method, head)", "runs", "samples/s",
               "s/epoch", "hours (all its runs)"], body),
        "",
        f"All planned runs: about {grand / 3600:.1f} hours at 1 run at a time.",
    ])  # fmt: skip
