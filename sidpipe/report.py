"""The short human-readable report printed at the end of a run."""

from __future__ import annotations

from typing import Any


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_report(s: dict[str, Any]) -> str:
    variant = f"/{s['variant']}" if s.get("variant") else ""
    lines = [
        f"== sidpipe: {s['method']}{variant}, {s['stages']} stage(s), "
        f"{s['model']} on {s['data']} ==",
        "test accuracy (last module): "
        + ("not evaluated" if s["test_accuracy"] is None else f"{s['test_accuracy']:.4f}"),
        "accuracy per depth: " + " ".join(f"{a:.3f}" for a in s["per_depth_accuracy"]),
        f"throughput: {s['samples_per_s']:.0f} samples/s   wall: {s['wall_s']:.1f} s",
    ]
    plan = s.get("partition_auto")
    if plan:
        lines.append(
            f"partition=auto {plan['cuts']}: per-message stage step [ms] predicted / measured: "
            + ", ".join(
                f"{p:.2f} / {m:.2f}" if m is not None else f"{p:.2f} / -"
                for p, m in zip(plan["predicted_stage_ms"], plan["measured_stage_ms"])
            )
        )
    for st in s.get("per_stage", []):
        lines.append(
            f"  stage {st['stage']}: busy {st['busy_fraction']:.2f}  "
            f"recv-wait {st.get('recv_wait_fraction', 0.0):.2f}  "
            f"recv {st.get('recv_fraction', 0.0):.2f}  "
            f"bytes fwd {_mib(st['bytes_sent_forward'])}  bwd {_mib(st['bytes_sent_backward'])}  "
            f"tensors {_mib(st.get('peak_tensor_memory_bytes', 0))} "
            f"(RSS {_mib(st['peak_memory_bytes'])})"
        )
    return "\n".join(lines)
