"""The studies' plots (matplotlib, Agg, imported on first use): PNGs under <out>/plots/."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from sidpipe.bench.accuracy.stats import Row, Series, mean_std


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, ax: Any, path: Path, title: str, legend: bool = True) -> None:
    plt = _plt()
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_depth_group(rows: list[Row], path: Path, title: str) -> None:
    """Test accuracy against depth: one line per seed, and their mean when there are several."""
    fig, ax = _plt().subplots(figsize=(5, 3.5))
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
    ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, ax, path, title)


def plot_lines(
    series: dict[str, Series],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str,
    hlines: dict[str, list[float]] | None = None,
    scale: float = 100.0,
) -> None:
    """One line per series: x values and, per x, the per-seed values (mean, std error bar)."""
    fig, ax = _plt().subplots(figsize=(6, 4))
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
    xs_all = sorted({x for xs, _ in series.values() for x in xs})
    if xs_all and all(float(x).is_integer() for x in xs_all):  # counts (K): no 4.5 ticks
        ax.set_xticks(xs_all)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _save(fig, ax, path, title, legend=bool(series))


def plot_curves(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """Test accuracy per epoch, one line per run."""
    fig, ax = _plt().subplots(figsize=(6, 4))
    for label, c in curves.items():
        ax.plot(range(1, len(c) + 1), [100 * x for x in c], marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    _save(fig, ax, path, title)
