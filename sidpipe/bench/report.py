"""Tables and pictures of a `sidpipe bench` result: markdown, PNG plots, stage timelines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SCHEME_LABEL = {"sid": "SID pipeline", "gpipe": "GPipe (BP)", "1f1b": "1F1B (BP)",
                "seq_sid": "sequential SID", "seq_bp": "sequential BP"}  # fmt: skip
COLORS = {"forward": "#4c72b0", "backward+step": "#dd8452", "compute": "#4c72b0",
          "forward+backward": "#4c72b0", "step": "#8172b3", "send": "#55a868",
          "recv-wait": "#d9d9d9", "recv": "#a6cee3", "send-wait": "#c44e52",
          "backward": "#dd8452"}  # fmt: skip


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [f"Command: `{result['command']}`  ", f"Machine: {result['machine']} "
             f"({result['versions']['processor']}), torch {result['versions']['torch']}, "
             f"{result['date']}", ""]  # fmt: skip
    if rows and "tta_target" in rows[0]:
        lines += [
            "| scheme | S | M | train s to val acc >= target | samples seen | test acc "
            "| best val |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            tta = "not reached" if r["tta_train_s"] is None else f"{r['tta_train_s']:.1f}"
            seen = "" if r["tta_step"] is None else r["tta_step"] * r["batch_size"]
            test = "" if r["tta_test_accuracy"] is None else f"{r['tta_test_accuracy']:.4f}"
            best = "" if r["best_val_accuracy"] is None else f"{r['best_val_accuracy']:.4f}"
            lines.append(f"| {SCHEME_LABEL[r['scheme']]} | {r['stages']} | {r['microbatches']} | "
                         f"{tta} | {seen} | {test} | {best} |")  # fmt: skip
        return "\n".join(lines) + "\n"
    if rows and rows[0].get("simulated"):
        lines += [
            "**SIMULATED** S-device pipelines from per-stage times measured on one "
            f"{rows[0]['device']} device (communication not modelled).",
            "",
            "| scheme | S | M | samples/s (simulated) | efficiency | SID/GPipe | SID/1F1B |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:

            def sim(key: str, r: dict[str, Any] = r) -> str:
                return f"{r[key]:.2f}" if r.get(key) is not None else ""

            lines.append(
                f"| {SCHEME_LABEL[r['scheme']]} | {r['stages']} | {r['microbatches']} | "
                f"{r['samples_per_s']:.0f} | {sim('efficiency')} | {sim('ratio_vs_gpipe')} | "
                f"{sim('ratio_vs_1f1b')} |"
            )
        lines += [
            "",
            "Measured per-stage times [ms]; step ratio = SID step (forward + update) / BP "
            "(forward + backward) of the same stage and message size:",
        ]
        for r in rows:
            if r["scheme"] != "sid":
                continue
            lines += ["", f"S={r['stages']}, M={r['microbatches']}, cuts {r.get('partition')}:"]
            for i, t in enumerate(r["stage_times_ms"]):
                ratio = (t["sid_forward"] + t["sid_update"]) / (t["bp_forward"] + t["bp_backward"])
                lines.append(
                    f"- stage {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items())
                    + f"; step ratio {ratio:.2f}"
                )  # fmt: skip
        return "\n".join(lines) + "\n"
    lines += [
        "| scheme | S | M | samples/s median [min–max] | efficiency | SID/GPipe | SID/1F1B | "
        "bubble measured | bubble textbook | fwd B/sample | bwd B/sample | tensor MiB/stage |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def opt(key: str, fmt: str = "{:.2f}", r: dict[str, Any] = r) -> str:
            return fmt.format(r[key]) if r.get(key) is not None else ""

        pipe = r["scheme"] in ("sid", "gpipe", "1f1b")
        lines.append(
            f"| {SCHEME_LABEL[r['scheme']]} | {r['stages'] if pipe else 1} | {r['microbatches']} | "
            f"{r['samples_per_s']:.0f} "
            f"[{r['samples_per_s_min']:.0f}–{r['samples_per_s_max']:.0f}] | "
            f"{opt('efficiency')} | {opt('ratio_vs_gpipe')} | {opt('ratio_vs_1f1b')} | "
            f"{r['bubble']:.2f} | {opt('textbook_bubble')} | {r['bytes_forward_per_sample']:.0f} | "
            f"{r['bytes_backward_per_sample']:.0f} | "
            f"{'/'.join(_mib(x) for x in r['peak_tensor_memory_bytes'])} |"
        )
    lines += [
        "",
        "tensor MiB/stage: peak memory of parameters, gradients, optimizer state and activations"
        " above a baseline taken before the model is built (mallinfo2 on CPU, allocator on CUDA).",
        "",
        "Per-stage fractions of the timed window (busy / recv-wait / recv / send-wait; "
        "recv-wait: idle, nothing arrived; recv: SID payload arriving, a copy the core does; "
        "BP counts every receive as recv-wait):",
        "",
    ]
    for r in rows:
        if r["scheme"] in ("sid", "gpipe", "1f1b"):
            parts = ", ".join(f"stage {st['stage']}: {st['busy']:.2f} / {st['recv_wait']:.2f} / "
                              f"{st['recv']:.2f} / {st['send_wait']:.2f}"
                              for st in r["per_stage"])  # fmt: skip
            lines.append(
                f"- {SCHEME_LABEL[r['scheme']]} S={r['stages']} M={r['microbatches']}: {parts}"
            )
    return "\n".join(lines) + "\n"


def plot_sweeps(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    paths = []
    for axis, label in (("stages", "pipeline stages S"), ("microbatches", "microbatches M")):
        other = "microbatches" if axis == "stages" else "stages"
        fig, ax = plt.subplots(figsize=(6, 4))
        for scheme in SCHEME_LABEL:
            mine = [r for r in rows if r["scheme"] == scheme]
            for fixed in sorted({r[other] for r in mine}):
                pts = sorted((r[axis], r["samples_per_s"]) for r in mine if r[other] == fixed)
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(
                        xs,
                        ys,
                        marker="o",
                        label=f"{SCHEME_LABEL[scheme]} ({other[0].upper()}={fixed})",
                    )
        ax.set_xlabel(label)
        ax.set_ylabel("samples/s (steady state, median)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        path = out / f"samples_per_s_vs_{axis}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_utilisation(rows: list[dict[str, Any]], out: Path) -> Path:
    pipes = [r for r in rows if r["scheme"] in ("sid", "gpipe", "1f1b")]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.35 * sum(len(r["per_stage"]) for r in pipes)))
    labels, y = [], 0
    for r in pipes:
        for st in r["per_stage"]:
            left = 0.0
            for key, color in (
                ("busy", "#4c72b0"),
                ("recv_wait", "#d9d9d9"),
                ("recv", "#a6cee3"),
                ("send_wait", "#c44e52"),
            ):
                ax.barh(y, st[key], left=left, color=color, label=key if y == 0 else None)
                left += st[key]
            labels.append(
                f"{r['scheme']} S={r['stages']} M={r['microbatches']} stage {st['stage']}"
            )
            y += 1
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the timed window")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    path = out / "stage_utilisation.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(row: dict[str, Any], out: Path, span_us: float | None = None) -> Path | None:
    """A short steady-state slice of one run's trace: the bubble is the white space."""
    trace_path = Path(row["run_dir"]) / "trace.json"
    if not trace_path.exists():
        return None
    events = [e for e in json.loads(trace_path.read_text())["traceEvents"] if e.get("ph") == "X"]
    stages = sorted({e["tid"] for e in events})
    sink = sorted((e for e in events if e["tid"] == stages[-1] and e["name"] == "train"),
                  key=lambda e: e["ts"])  # fmt: skip
    if len(sink) < 4:
        return None
    t0 = sink[len(sink) // 2]["ts"]
    width = span_us or (sink[-1]["ts"] - sink[0]["ts"]) / len(sink) * 12
    fig, ax = plt.subplots(figsize=(10, 0.8 + 0.6 * len(stages)))
    seen = set()
    for e in events:
        if e["name"] == "train" or e["ts"] + e["dur"] < t0 or e["ts"] > t0 + width:
            continue
        color = COLORS.get(e["name"], "#937860")
        ax.broken_barh([((e["ts"] - t0) / 1e3, e["dur"] / 1e3)], (e["tid"] - 0.4, 0.8), color=color,
                       label=e["name"] if e["name"] not in seen else None)  # fmt: skip
        seen.add(e["name"])
    ax.set_xlim(0, width / 1e3)
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"{SCHEME_LABEL[row['scheme']]}, S={row['stages']}, M={row['microbatches']}: "
                 "steady-state slice (grey = waiting: the bubble)")  # fmt: skip
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.5), ncol=8, frameon=False)
    path = out / f"timeline_{row['scheme']}_S{row['stages']}_M{row['microbatches']}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(markdown(result))
    rows = result["rows"]
    paths = [out / "bench.md"]
    if rows and rows[0].get("simulated"):
        paths += plot_sweeps(rows, out)
    elif rows and "samples_per_s" in rows[0]:
        paths += plot_sweeps(rows, out)
        paths.append(plot_utilisation(rows, out))
        # SID and GPipe of each (S, M) on one time scale: three GPipe batches wide.
        for gp in (r for r in rows if r["scheme"] == "gpipe"):
            width = 3 * gp["batch_size"] / gp["samples_per_s"] * 1e6
            for r in rows:
                if r["scheme"] in ("sid", "gpipe") and (r["stages"], r["microbatches"]) == (
                    gp["stages"],
                    gp["microbatches"],
                ):
                    p = plot_timeline(r, out, span_us=width)
                    if p is not None:
                        paths.append(p)
    return paths
