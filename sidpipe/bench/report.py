"""Tables and pictures of a `sidpipe bench` result: markdown, PNG plots, stage timelines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from sidpipe.runtime.io import mib  # noqa: E402

SCHEME_LABEL = {"sid": "SID pipeline", "gpipe": "GPipe (BP)", "1f1b": "1F1B (BP)",
                "interleaved_1f1b": "Interleaved 1F1B (BP)", "looped_bfs": "Looped BFS (BP)",
                "interleaved_zb": "Interleaved zero bubble (BP)", "zbv": "ZBV zero bubble (BP)",
                "dualpipev": "DualPipeV (BP)", "seq_sid": "sequential SID",
                "seq_bp": "sequential BP"}  # fmt: skip
PIPELINES = ("sid", "gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv",
             "dualpipev")  # fmt: skip
BP = PIPELINES[1:]
COLORS = {"forward": "#4c72b0", "backward+step": "#dd8452", "compute": "#4c72b0",
          "forward+backward": "#4c72b0", "step": "#8172b3", "send": "#55a868",
          "recv-wait": "#d9d9d9", "recv": "#a6cee3", "send-wait": "#c44e52",
          "backward": "#dd8452"}  # fmt: skip


def _opt(r: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(r[key]) if r.get(key) is not None else ""


def headline_lines(result: dict[str, Any], simulated: bool) -> list[str]:
    """The two views of the headline, per S, and what is held equal."""
    b = result["config"]["bench"]
    tag = " (SIMULATED)" if simulated else ""
    lines = [f"## Headline{tag}: SID against the fastest BP schedule", "",
             "| S | fastest BP (schedule, M) | BP samples/s | SID, equal update size "
             "(message = B) | ratio | SID at its fastest (message) | ratio |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for h in result.get("headline", []):
        best, fast = h["best_bp"], h["sid_fastest"]
        eq = "" if h["sid_equal_update"] is None else f"{h['sid_equal_update']:.0f}"
        ratio = "" if h["ratio_equal_update"] is None else f"**{h['ratio_equal_update']:.2f}**"
        lines.append(f"| {h['stages']} | {best['schedule']}, M={best['microbatches']} | "
                     f"{best['samples_per_s']:.0f} | {eq} | {ratio} | "
                     f"{fast['samples_per_s']:.0f} ({fast['message']} samples) | "
                     f"{h['ratio_fastest']:.2f} |")  # fmt: skip
    lines += [
        "",
        f"Held equal: the model and data, batch B={b['batch_size']}, the learning rate and "
        "optimizer (the same for every scheme), the seed, threads and core pinning. The fastest"
        " BP is the best samples/s over every schedule and M of the grid below. *Equal update "
        "size*: SID sends messages of B samples and updates once per message, so both methods "
        "make one optimizer step per B samples. *At its fastest*: SID at the message size that "
        "gives it the most samples/s (smaller messages mean more updates per sample than BP, "
        "so that view compares speed, not the same training). Partition: SID and the "
        "one-stage-per-rank schedules use the same cuts; the multi-stage schedules cut the "
        "model into S x stages_per_rank stages (uniform, or re-planned with partition=auto).",
        "",
    ]
    return lines


def grid_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Samples/s of every BP schedule and M (the grid the headline picks from)."""
    ms = sorted({r["microbatches"] for r in rows if r["scheme"] in BP})
    lines = ["## BP schedules, samples/s", "",
             "| S | schedule | " + " | ".join(f"M={m}" for m in ms) + " |",
             "|---|---|" + "---|" * len(ms)]  # fmt: skip
    for s in sorted({r["stages"] for r in rows}):
        for scheme in BP:
            mine = {r["microbatches"]: r for r in rows
                    if r["scheme"] == scheme and r["stages"] == s}  # fmt: skip
            if not mine:
                continue
            cells = [
                _opt(mine[m], "samples_per_s", "{:.0f}")
                if m in mine and "samples_per_s" in mine[m]
                else ("n/a" if m in mine else "")
                for m in ms
            ]
            lines.append(f"| {s} | {scheme} | " + " | ".join(cells) + " |")  # fmt: skip
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        lines += ["", "n/a (not run, the schedule's constraint):"]
        lines += [f"- {r['scheme']} S={r['stages']} M={r['microbatches']}: {r['skipped']}"
                  for r in skipped]  # fmt: skip
    return lines + [""]


def tta_lines(result: dict[str, Any]) -> list[str]:
    rows = [r for r in result["rows"] if "tta_target" in r]
    target = rows[0]["tta_target"] if rows else None
    lines = [f"## Time to validation accuracy >= {target}", "",
             "Each method at its best learning rate, chosen by mean best validation accuracy "
             "over the seeds (never by test); time and samples to the target are means over "
             "seeds, shown only when every seed reached it.", "",
             "| scheme | S | M | chosen lr | seeds | train s to target | samples to target | "
             "best val | test at best val |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for sel in result.get("lr_selection", []):
        c = sel["chosen"]
        lines.append(f"| {SCHEME_LABEL[sel['scheme']]} | {sel['stages']} | "
                     f"{sel['microbatches']} | {c['lr']} | {c['seeds']} | "
                     f"{_opt(c, 'tta_train_s', '{:.1f}') or 'not reached'} | "
                     f"{_opt(c, 'tta_samples', '{:.0f}')} | {c['best_val_accuracy']:.4f} | "
                     f"{c['test_at_best_val']:.4f} |")  # fmt: skip
    lines += ["", "The whole sweep:", "",
              "| scheme | S | M | lr | seeds reached | train s to target | best val |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for sel in result.get("lr_selection", []):
        for x in sel["sweep"]:
            lines.append(
                f"| {sel['scheme']} | {sel['stages']} | {sel['microbatches']} | "
                f"{x['lr']} | {x['reached']}/{x['seeds']} | "
                f"{_opt(x, 'tta_train_s', '{:.1f}')} | {x['best_val_accuracy']:.4f} |"
            )
    return lines + [""]


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [f"Command: `{result['command']}`  ", f"Machine: {result['machine']} "
             f"({result['versions']['processor']}), torch {result['versions']['torch']}, "
             f"{result['date']}", ""]  # fmt: skip
    if any("tta_target" in r for r in rows):
        return "\n".join(lines + tta_lines(result))
    simulated = any(r.get("simulated") for r in rows)
    if simulated:
        device = next(r.get("device", "") for r in rows if r.get("simulated"))
        lines += ["**SIMULATED** S-device pipelines from per-stage times measured on one "
                  f"{device} device; every number in this file is simulated.", ""]  # fmt: skip
    lines += headline_lines(result, simulated) + grid_lines(rows)
    ran = [r for r in rows if "samples_per_s" in r]
    lines += [
        "## Every run" + (" (SIMULATED)" if simulated else ""), "",
        "M: BP microbatches per batch of B; SID messages of B/M samples (M=1: one message of B)."
        " SID/best BP at M: against the fastest schedule at the same M.", "",
        "| scheme | S | M | samples/s median [min–max] | efficiency | SID/best BP at M | "
        "bubble measured | bubble textbook | fwd B/sample | bwd B/sample | tensor MiB/stage |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in ran:
        ratios = [v for k, v in r.items() if k.startswith("ratio_vs_")]
        vs_best = f"{min(ratios):.2f}" if ratios else ""
        spread = (f" [{r['samples_per_s_min']:.0f}–{r['samples_per_s_max']:.0f}]"
                  if "samples_per_s_min" in r else "")  # fmt: skip
        mem = "/".join(mib(x) for x in r.get("peak_tensor_memory_bytes", []))
        lines.append(
            f"| {SCHEME_LABEL[r['scheme']]} | {r['stages'] if r['scheme'] in PIPELINES else 1} | "
            f"{r['microbatches']} | {r['samples_per_s']:.0f}{spread} | {_opt(r, 'efficiency')} | "
            f"{vs_best} | {_opt(r, 'bubble')} | {_opt(r, 'textbook_bubble')} | "
            f"{_opt(r, 'bytes_forward_per_sample', '{:.0f}')} | "
            f"{_opt(r, 'bytes_backward_per_sample', '{:.0f}')} | {mem} |"
        )  # fmt: skip
    if simulated:
        lines += ["", "Measured per-stage times [ms]; step ratio = SID step (forward + update) / "
                  "BP (forward + backward) of the same stage and message size:"]  # fmt: skip
        for r in ran:
            if r["scheme"] != "sid" or not r.get("stage_times_ms"):
                continue
            lines += ["", f"S={r['stages']}, M={r['microbatches']}, cuts {r.get('partition')}:"]
            for i, t in enumerate(r["stage_times_ms"]):
                bp = t["bp_forward"] + t.get(
                    "bp_backward", t.get("bp_input_grad", 0) + t.get("bp_weight_grad", 0)
                )
                ratio = (t["sid_forward"] + t["sid_update"]) / bp
                lines.append(f"- stage {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items())
                             + f"; step ratio {ratio:.2f}")  # fmt: skip
        return "\n".join(lines) + "\n"
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
    for r in ran:
        if r["scheme"] in PIPELINES and "per_stage" in r:
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
            mine = [r for r in rows if r["scheme"] == scheme and "samples_per_s" in r]
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
    pipes = [r for r in rows if r["scheme"] in PIPELINES and "per_stage" in r]
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
    elif any("samples_per_s" in r for r in rows):
        paths += plot_sweeps(rows, out)
        paths.append(plot_utilisation(rows, out))
        # SID and GPipe of each (S, M) on one time scale: three GPipe batches wide.
        for gp in (r for r in rows if r["scheme"] == "gpipe" and "samples_per_s" in r):
            width = 3 * gp["batch_size"] / gp["samples_per_s"] * 1e6
            for r in rows:
                same = (r["stages"], r["microbatches"]) == (gp["stages"], gp["microbatches"])
                if r["scheme"] in ("sid", "gpipe") and "run_dir" in r and same:
                    p = plot_timeline(r, out, span_us=width)
                    if p is not None:
                        paths.append(p)
    return paths
