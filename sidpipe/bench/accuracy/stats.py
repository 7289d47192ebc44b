"""Numbers of a study from its rows: mean ± std over seeds, paired per-seed differences, the
verdict (above / level with / below, against the seed spread), and each study's table body
and one-line findings. Pure functions of the rows: no files, no plots."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sidpipe.bench.accuracy.plan import STUDIES

Row = dict[str, Any]
# x values and, per x, the per-seed values: one line of a plot (mean, std error bar)
Series = tuple[list[float], list[list[float]]]
AlphaSeries = tuple[dict[str, Series], list[float]]  # SID lines per KL direction, BP's values

PAPER_REFERENCE = {"bp": 0.9906, "sid": 0.9931}  # best-epoch test accuracy, authors' run log
TOL = 0.001  # accuracy differences below 0.1 point count as "matches" (or the seed spread)
METRICS = (
    ("last", "test_accuracy", "last epoch"),
    ("best", "best_epoch_test_accuracy", "best epoch (test-selected)"),
    ("val", "val_selected_test_accuracy", "val-selected"),
)


def ok_rows(rows: Iterable[Row]) -> list[Row]:
    ok = ("ran", "reused")
    return [r for r in rows if r.get("status") in ok and r.get("test_accuracy") is not None]


def values(rows: Iterable[Row], key: str) -> list[float]:
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


def paired(a: list[Row], b: list[Row], key: str) -> list[float]:
    """Per-seed differences a - b on `key` (seeds present in both)."""
    bs = {r["seed"]: r[key] for r in b if r.get(key) is not None}
    return [r[key] - bs[r["seed"]] for r in a if r.get(key) is not None and r["seed"] in bs]


def verdict(diffs: list[float]) -> tuple[float, str]:
    """Mean difference and whether it is above / within / below the noise (seed spread)."""
    m = statistics.fmean(diffs)
    tol = max(TOL, statistics.stdev(diffs) if len(diffs) > 1 else 0.0)
    return m, ("above" if m > tol else "below" if m < -tol else "level with")


def paired_t_p(diffs: list[float]) -> float | None:
    """Two-sided p-value of the paired t-test that the mean difference is 0 (Student's t with
    n - 1 degrees of freedom, exact for integer df: Abramowitz & Stegun 26.7.3-4); None with
    fewer than 2 pairs. With 3 seeds (df 2) only |t| > 4.30 reaches p < 0.05: a cell's three
    seeds are weak evidence, and the table says so rather than pooling cells that share seeds."""
    n = len(diffs)
    if n < 2:
        return None
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0.0:
        return 0.0 if m != 0.0 else 1.0
    df = n - 1
    theta = math.atan(abs(m) / (sd / math.sqrt(n)) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + c2/2 + 1*3 c2^2/(2*4) + ...), df/2 terms
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = math.sin(theta) * total
    else:  # (2/pi) (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...)), (df-1)/2 terms
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    return max(0.0, 1.0 - inside)


def holm(ps: list[float], alpha: float = 0.05) -> list[bool]:
    """Which of a family of p-values survive Holm's step-down correction at `alpha` (the
    family-wise error rate, without assuming the tests are independent)."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    keep = [False] * len(ps)
    for rank, i in enumerate(order):
        if ps[i] > alpha / (len(ps) - rank):
            break
        keep[i] = True
    return keep


def by(rows: Iterable[Row], *keys: str) -> dict[tuple, list[Row]]:
    out: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        out[tuple(r.get(k) for k in keys)].append(r)
    return out


def table(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def runs_cell(rows: list[Row]) -> str:
    """'3 × 10' (seeds × epochs), with the training subset when there was one."""
    kinds = sorted({(r.get("epochs"), r.get("subset")) for r in rows}, key=str)
    cells = [f"{e}" + (f" (subset {n})" if n else "") for e, n in kinds]
    return f"{len(rows)} × {'/'.join(cells)}"


def metric_cols(rows: list[Row]) -> list[str]:
    return [pct(values(rows, key)) for _, key, _ in METRICS]


def monotone(curve: list[float], tol: float = 0.0) -> bool:
    return all(b >= a - tol for a, b in zip(curve, curve[1:]))


# ---------------------------------------------------------------------------- per study


def reference_stats(good: list[Row]) -> tuple[list[list[Any]], list[str]]:
    body, findings = [], []
    for (data,), grp in sorted(by(good, "dataset").items()):
        sid = [r for r in grp if r["method"] == "sid"]
        bp = [r for r in grp if r["method"] == "bp"]
        for method, rs in (("bp", bp), ("sid", sid)):
            paper = PAPER_REFERENCE[method] if data == "mnist" else None
            name = "SID (shared)" if method == "sid" else "BP"
            body.append([data, name, *metric_cols(rs), f"{100 * paper:.2f}" if paper else "–",
                         secs(values(rs, "s_per_epoch")), runs_cell(rs)])  # fmt: skip
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
    return body, findings


# Published anchors for CIFAR-10 (full set, ResNet-32 cut into K local modules): test
# accuracy minus end-to-end BP's, in points, as reported by Wang et al., "Revisiting Locally
# Supervised Learning: an Alternative to End-to-end Training" (InfoPro), ICLR 2021, for greedy
# supervised local learning (DGL-style) and for InfoPro. Approximate; other network and data size.
PUBLISHED_GAPS = {
    "greedy (DGL-style)": {4: -4.0, 8: -7.0},
    "InfoPro": {4: -1.2, 8: -3.8},
}
PUBLISHED_SOURCE = "Wang et al., InfoPro, ICLR 2021 (ResNet-32, full CIFAR-10)"
LOCAL_METHODS = {"sid": "SID", "greedy": "greedy (α=1)"}  # the blockwise study's local methods
FLAT_POINTS = 1.0  # BP's curve counts as flat when its last quarter gains less than this


def model_label(r: Row) -> str:
    """The model and the model.width its runs used (the plain name where the config had
    none: the architecture's standard width)."""
    width = r.get("width")
    return f"{r['model']} (width {width})" if width else str(r["model"])


def by_model(rows: Iterable[Row]) -> dict[tuple, list[Row]]:
    """Rows grouped by (dataset, model label): one group per network the tables compare."""
    out: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        out[(r.get("dataset"), model_label(r))].append(r)
    return out


def flatness(bp: list[Row]) -> tuple[float, int] | None:
    """Mean over seeds of BP's validation accuracy gain over the last quarter of its epochs
    (last epoch minus the epoch 3/4 of the way through), in points, and the epochs run."""
    curves = [r["val_curve"] for r in bp if len(r.get("val_curve") or []) >= 4]
    if not curves:
        return None
    gains = [c[-1] - c[(3 * len(c)) // 4 - 1] for c in curves]
    return 100 * statistics.fmean(gains), len(curves[0])


def head_of(r: Row) -> str:
    """A run's belief head; rows from before heads were a study dimension used pool."""
    return r.get("head") or "pool"


def local_arms(grp: list[Row]) -> list[tuple[str, str, str]]:
    """(method, head, label) of every local method x head that ran in this network's rows.
    The head appears in the label only when the network ran more than one."""
    local = [r for r in grp if r["method"] in LOCAL_METHODS]
    heads = sorted({head_of(r) for r in local}, key=lambda h: (h != "pool", h))
    arms = []
    for method, name in LOCAL_METHODS.items():
        for head in heads:
            if any(r["method"] == method and head_of(r) == head for r in local):
                arms.append((method, head, f"{name}, {head} head" if len(heads) > 1 else name))
    return arms


def arm_rows(grp: list[Row], method: str, head: str) -> list[Row]:
    return [r for r in grp if r["method"] == method and head_of(r) == head]


def blockwise_stats(
    good: list[Row],
) -> tuple[list[list[Any]], list[str], dict[str, dict[str, Series]]]:
    """Table body, findings, and per dataset the local − BP gap against blocks of each model
    and local method (and head, where a study ran several)."""
    body, findings = [], []
    settings = level_or_above = 0
    gap_series: dict[str, dict[str, Series]] = defaultdict(dict)
    for (data, model), grp in sorted(by_model(good).items()):
        bp = [r for r in grp if r["method"] == "bp"]
        body.append([data, model, "BP", *metric_cols(bp), "–", "–",
                     secs(values(bp, "s_per_epoch")), runs_cell(bp)])  # fmt: skip
        flat = flatness(bp)
        if flat:
            gain, n = flat
            verdict_ = "flat" if abs(gain) < FLAT_POINTS else "NOT flat: more epochs would move it"
            if verdict_ == "flat" and any(r.get("schedule") == "cosine" for r in bp):
                verdict_ += (  # the rule cannot tell converged from annealed
                    "; but its lr decays to 0 (cosine), which flattens the end of any run: "
                    "only a run with more epochs shows whether it converged"
                )
            findings.append(
                f"BP {model} on {data}: validation accuracy changed {gain:+.2f} points over the "
                f"last quarter of its {n} epochs ({verdict_}; threshold {FLAT_POINTS:g} point)."
            )
        for method, head, name in local_arms(grp):
            by_blocks = by(arm_rows(grp, method, head), "blocks")
            xs, ys, parts = [], [], []
            for (blocks,), local in sorted(by_blocks.items()):
                gaps = {k: paired(local, bp, key) for k, key, _ in METRICS}
                body.append([data, model, f"{name} {blocks} blocks", *metric_cols(local),
                             pct(gaps["last"], signed=True), pct(gaps["val"], signed=True),
                             secs(values(local, "s_per_epoch")), runs_cell(local)])  # fmt: skip
                if gaps["last"]:
                    xs.append(blocks)
                    ys.append(gaps["last"])
                    m, v = verdict(gaps["last"])
                    if method == "sid" and head == "pool":  # the paper's setting
                        settings += 1
                        level_or_above += v != "below"
                    parts.append(f"{100 * m:+.2f} at {blocks} blocks ({v} BP)")
            if not xs:
                continue
            gap_series[data][f"{model} {name}"] = (xs, ys)
            means = [statistics.fmean(y) for y in ys]
            trend = ""
            if len(means) > 1:
                if all(b < a for a, b in zip(means, means[1:])):
                    trend = f"; {name} falls further behind BP as the network is cut finer"
                elif all(b > a for a, b in zip(means, means[1:])):
                    trend = f"; {name} gains on BP as the network is cut finer"
                else:
                    trend = "; no monotone trend with the number of blocks"
            findings.append(
                f"Blockwise {model} on {data}: {name} − BP (last-epoch test accuracy) "
                + ", ".join(parts) + trend + "."
            )  # fmt: skip
        findings += consistency_findings(grp, data, model)
    findings += pooled_consistency(good)
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
    return body, findings, gap_series


def consistency_findings(grp: list[Row], data: str, model: str) -> list[str]:
    """SID − greedy per block count and head: what the belief-consistency term adds over the
    label term alone (validation-selected test accuracy, paired by seed)."""
    heads = sorted({head_of(r) for r in grp if r["method"] in LOCAL_METHODS})
    lines = []
    for head in heads:
        sid = by(arm_rows(grp, "sid", head), "blocks")
        greedy = by(arm_rows(grp, "greedy", head), "blocks")
        parts = []
        for (blocks,) in sorted(set(sid) & set(greedy)):
            diffs = paired(sid[(blocks,)], greedy[(blocks,)], "val_selected_test_accuracy")
            if diffs:
                m, v = verdict(diffs)
                parts.append(f"{100 * m:+.2f} at {blocks} blocks ({v})")
        if parts:
            which = f", {head} head" if len(heads) > 1 else ""
            lines.append(
                f"Consistency term ({model} on {data}{which}): SID − greedy (α=1), val-selected "
                "test accuracy, " + ", ".join(parts) + "."
            )
    return lines


def pooled_consistency(good: list[Row]) -> list[str]:
    """SID − greedy pooled over every (dataset, model, blocks, head) cell, paired by seed:
    a description, not a test. The cells share seeds (data order, initialisation) and the
    data split, so their pairs are not independent evidence and no p-value is given."""
    diffs: dict[int, list[float]] = defaultdict(list)
    cells: dict[int, int] = defaultdict(int)
    for grp in by_model(good).values():
        for head in {head_of(r) for r in grp}:
            sid = by(arm_rows(grp, "sid", head), "blocks")
            greedy = by(arm_rows(grp, "greedy", head), "blocks")
            for (blocks,) in set(sid) & set(greedy):
                pairs = paired(sid[(blocks,)], greedy[(blocks,)], "val_selected_test_accuracy")
                if pairs:
                    diffs[blocks] += pairs
                    cells[blocks] += 1
    if sum(cells.values()) < 2:
        return []  # one cell: consistency_findings already says it
    groups = [("all", [d for b in sorted(diffs) for d in diffs[b]], sum(cells.values()))]
    groups += [(f"{b} blocks", diffs[b], cells[b]) for b in sorted(diffs) if cells[b] > 1]
    parts = []
    for label, ds, n_cells in groups:
        ahead, behind = sum(d > 0 for d in ds), sum(d < 0 for d in ds)
        sd = statistics.stdev(ds) if len(ds) > 1 else 0.0
        parts.append(
            f"{label} ({n_cells} cells, {len(ds)} pairs) {100 * statistics.fmean(ds):+.2f} ± "
            f"{100 * sd:.2f}, SID ahead in {ahead}, behind in {behind}"
        )
    return [
        "Consistency term pooled over cells (descriptive only: the cells share seeds and the "
        "data split, so the pairs are not independent evidence and no test is made): SID − "
        "greedy (α=1), val-selected test accuracy, paired by seed, mean ± std in points: "
        + "; ".join(parts) + "."
    ]  # fmt: skip


def _diff_row(data: str, model: str, blocks: Any, what: str, a: list[Row], b: list[Row]):
    val = paired(a, b, "val_selected_test_accuracy")
    last = paired(a, b, "test_accuracy")
    if not val and not last:
        return None
    seeds = " / ".join(f"{100 * d:+.1f}" for d in val) or "–"
    return [data, model, blocks, what, pct(val, signed=True), pct(last, signed=True), seeds]


def paired_table(good: list[Row]) -> tuple[list[str], list[list[Any]]]:
    """Every paired difference per cell (dataset, model, blocks), in points, mean ± std over
    seeds, for validation-selected and last-epoch test accuracy, with the per-seed values:
    each local arm − BP, SID − greedy per head, and each head − pool per method."""
    header = ["data", "model", "blocks", "difference", "val-selected", "last epoch",
              "per seed (val-selected)"]  # fmt: skip
    body = []
    for (data, model), grp in sorted(by_model(good).items()):
        bp = [r for r in grp if r["method"] == "bp"]
        arms = local_arms(grp)
        heads = sorted({h for _, h, _ in arms}, key=lambda h: (h != "pool", h))
        for k in sorted({r["blocks"] for r in grp if r["method"] in LOCAL_METHODS}):
            cell = [r for r in grp if r.get("blocks") == k]
            pairs = [(f"{label} − BP", arm_rows(cell, m, h), bp) for m, h, label in arms]
            for h in heads:
                which = f" ({h} head)" if len(heads) > 1 else ""
                pairs.append((f"SID − greedy{which}", arm_rows(cell, "sid", h),
                              arm_rows(cell, "greedy", h)))  # fmt: skip
            for m, name in LOCAL_METHODS.items():
                for h in heads[1:]:
                    pairs.append((f"{name}: {h} − pool head", arm_rows(cell, m, h),
                                  arm_rows(cell, m, "pool")))  # fmt: skip
            for what, a, b in pairs:
                row_ = _diff_row(data, model, k, what, a, b)
                if row_:
                    body.append(row_)
    return header, body


def anchor_table(good: list[Row]) -> tuple[list[str], list[list[Any]]]:
    """This study's val-selected gaps to BP per block count next to the published ones."""
    names = list(PUBLISHED_GAPS)
    arms = local_arms(good) or [(m, "pool", n) for m, n in LOCAL_METHODS.items()]
    header = ["data", "model", "blocks",
              *[f"{label} − BP (this study)" for _, _, label in arms],
              *[f"{n} − BP (published)" for n in names]]  # fmt: skip
    body = []
    for (data, model), grp in sorted(by_model(good).items()):
        bp = [r for r in grp if r["method"] == "bp"]
        blocks = sorted({r["blocks"] for r in grp if r["method"] in LOCAL_METHODS})
        for k in blocks:
            cells = []
            for method, head, _ in arms:
                local = [r for r in arm_rows(grp, method, head) if r["blocks"] == k]
                gap = paired(local, bp, "val_selected_test_accuracy")
                cells.append(pct(gap, signed=True) if gap else "–")
            published = [f"{PUBLISHED_GAPS[n][k]:+.1f}" if k in PUBLISHED_GAPS[n] else "–"
                         for n in names]  # fmt: skip
            body.append([data, model, k, *cells, *published])
    return header, body


ROBUSTNESS = {
    "above": "SID loses less, as a more robust method should",
    "level with": "both lose about the same (no robustness advantage)",
    "below": "SID loses more, which contradicts the paper's robustness claim",
}


def noise_findings(grp: list[Row], clean: dict[str, list[Row]], data: str, arch: str) -> list[str]:
    """SID vs BP at every noise rate > 0, and which method loses more from its clean run."""
    findings = []
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
                        f"{100 * statistics.fmean(d_bp):+.2f} points: " + ROBUSTNESS[dv]
                    )
            findings.append(line + ".")
    return findings


def noise_stats(
    good: list[Row],
) -> tuple[list[list[Any]], list[str], dict[tuple[str, str], dict[str, Series]]]:
    """Table body, findings, and per (arch, dataset) accuracy against the noise rate."""
    body, findings, series_of = [], [], {}
    for (arch, data), grp in sorted(by(good, "arch", "dataset").items()):
        clean = {m: [r for r in grp if r["method"] == m and not r["noise"]] for m in ("bp", "sid")}
        series = {}
        for method in ("bp", "sid"):
            xs, ys = [], []
            mine = [r for r in grp if r["method"] == method]
            for (rate,), rs in sorted(by(mine, "noise").items()):
                drop = paired(rs, clean[method], "test_accuracy") if rate else []
                body.append([arch, data, f"{rate:.0%}", method.upper(),
                             pct(values(rs, "label_noise_rate")), *metric_cols(rs),
                             pct(drop, signed=True) if drop else "–", runs_cell(rs)])  # fmt: skip
                xs.append(100 * rate)
                ys.append(values(rs, "test_accuracy"))
            series[method.upper()] = (xs, ys)
        series_of[(arch, data)] = series
        findings += noise_findings(grp, clean, data, arch)
    return body, findings, series_of


def alpha_stats(
    good: list[Row],
) -> tuple[list[list[Any]], list[str], dict[tuple[str, str], AlphaSeries]]:
    """Table body, findings, and per (arch, dataset) accuracy against alpha (and BP's)."""
    body, findings, series_of = [], [], {}
    for (arch, data), grp in sorted(by(good, "arch", "dataset").items()):
        bp = [r for r in grp if r["method"] == "bp"]
        body.append([arch, data, "BP", "–", *metric_cols(bp), "–",
                     secs(values(bp, "s_per_epoch")), runs_cell(bp)])  # fmt: skip
        series = {}
        for (kl,), rs in sorted(by([r for r in grp if r["method"] == "sid"], "kl").items()):
            xs, ys, means = [], [], {}
            for (alpha,), ar in sorted(by(rs, "alpha").items()):
                gap = paired(ar, bp, "test_accuracy")
                body.append([arch, data, f"SID {kl}", f"{alpha:g}", *metric_cols(ar),
                             pct(gap, signed=True) if gap else "–",
                             secs(values(ar, "s_per_epoch")), runs_cell(ar)])  # fmt: skip
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
        series_of[(arch, data)] = (series, values(bp, "test_accuracy"))
    return body, findings, series_of


def depth_plot_path(study: str, group: str) -> str:
    return f"plots/depth/{study}/{group}.png"


def depth_stats(
    studies: dict[str, dict[str, Any]],
) -> tuple[list[list[Any]], list[str], list[tuple[str, str, list[Row]]]]:
    """Study 3 over every SID run with more than one depth, from all studies present: table
    body, findings, and the (study, group, rows) of each configuration (one plot each)."""
    body, groups = [], []
    total = strict = loose = last_best = 0
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
            total += len(curves)
            strict += k_strict
            loose += k_loose
            last_best += sum(c[-1] >= max(c) for c in curves)
            drop = max(mean) - mean[-1]
            if drop > 0 and (worst is None or drop > worst[0]):
                worst = (drop, f"{study}/{group}")
            groups.append((study, group, grp))
            body.append([study, f"[`{group}`]({depth_plot_path(study, group)})",
                         " → ".join(f"{100 * x:.1f}" for x in mean),
                         f"{k_strict}/{len(curves)}", f"{k_loose}/{len(curves)}",
                         f"{1 + mean.index(max(mean))}/{n_depth}",
                         f"{100 * (mean[-1] - max(mean)):+.2f}"])  # fmt: skip
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
    return body, findings, groups
