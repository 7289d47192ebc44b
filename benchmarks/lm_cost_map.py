"""Where could SID beat BP on a language model? A cost model from measured `sidpipe bench` runs.

Per batch, in sequential seconds (one device), with f(d) = d^2 + C d / 6 the per-token
FLOPs of a decoder layer up to a constant (24 d^2 for the matmuls, 4 C d for attention):

    SID module  T_mod(d, V, Lm) = Lm * a_sid * f(d) / f(d0)  +  V * c_sid(d)
    BP network  T_bp(d, V, L)   = L  * a_bp  * f(d) / f(d0)  +  V * c_bp(d)
    c(d) = c(d0) * (phi * d / d0 + 1 - phi)

a: one layer's forward + backward (+ step); V c(d): the belief head (a d x V matmul, the
share phi of its V-dependent cost) and its loss over V (the rest, independent of d). SID
pays one head per module (K of them), BP one for the network. A pipeline of S stages runs
each at efficiency e (measured at S = 2: pipeline samples/s over S x sequential samples/s), so

    SID / best BP = (e_sid / e_bp) * T_bp / (K * T_mod)       (one module per stage: K = S)

Calibration: the sequential SID and BP rows of the d = d0, one-layer-per-module runs at
two or more V (the line through them: see `_line`), phi from the per-stage split's heads vs
loss columns (`benchmarks/lm_vocab.py`). Validation: the measured ratio of any other run
(another width or depth), printed beside the prediction with its error. Then the map: the
ratio over a grid of d, V, layers per module and S (e_sid / e_bp at S > 2 from SIMULATED
runs), and the region where it reaches 1.2.
The grid beyond the measured points is an extrapolation by FLOP counts.

    python benchmarks/lm_cost_map.py --calibrate DIR [DIR ...] --split SPLIT.json \
        [--validate DIR ...] [--efficiency SIMULATED_DIR ...] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Run:
    """What the model needs from one `sidpipe bench` run at S = 2 (sequential rows included)."""

    d: int
    vocab: int
    layers_per_module: int
    modules: int
    context: int
    t_seq_sid: float  # seconds per batch, sequential SID, message = batch
    t_seq_bp: float  # seconds per batch, sequential BP
    e_sid: float
    e_bp: float
    ratio: float  # measured SID (message = batch) / fastest BP schedule


def _rates(b: dict[str, Any]) -> dict[tuple[str, int, int], float]:
    return {(r["scheme"], r["stages"], r["microbatches"]): r["samples_per_s"] for r in b["rows"]}


def efficiencies(b: dict[str, Any]) -> dict[int, tuple[float, float]]:
    """Per S of a bench.json's headline: (e_sid, e_bp), each the pipeline's samples/s over S
    x its sequential samples/s (SID with message = batch; the fastest BP schedule at its M)."""
    rate, out = _rates(b), {}
    for head in b["headline"]:
        s, best = head["stages"], head["best_bp"]
        e_sid = rate[("sid", s, 1)] / (s * rate[("seq_sid", s, 1)])
        e_bp = best["samples_per_s"] / (s * rate[("seq_bp", s, best["microbatches"])])
        out[s] = (e_sid, e_bp)
    return out


def map_efficiencies(at_s2: float, simulated: list[dict[str, Any]]) -> dict[int, float]:
    """e_sid / e_bp per S for the map: the calibration's at S = 2; above, each SIMULATED
    bench.json's at S = its module count only (the map is of S = K pipelines, one module
    per stage), averaged per S."""
    per_s: dict[int, list[float]] = {2: [at_s2]}
    for b in simulated:
        k = b["config"]["model"]["blocks"] or b["config"]["model"]["depth"]
        for s, (e_sid, e_bp) in efficiencies(b).items():
            if s != 2 and s == k:
                per_s.setdefault(s, []).append(e_sid / e_bp)
    return {s: sum(v) / len(v) for s, v in per_s.items()}


def read_run(bench_dir: Path) -> Run:
    """One run's numbers from its bench.json (the rows and the config it ran with)."""
    b = json.loads((bench_dir / "bench.json").read_text())
    cfg, rate, head = b["config"], _rates(b), b["headline"][0]
    s, m_bp = head["stages"], head["best_bp"]["microbatches"]
    e_sid, e_bp = efficiencies(b)[s]
    vocab = cfg["data"]["vocab_size"] if cfg["data"]["tokenizer"] == "bpe" else 256
    depth, blocks = cfg["model"]["depth"], cfg["model"]["blocks"] or cfg["model"]["depth"]
    batch = cfg["bench"]["batch_size"]
    return Run(
        d=cfg["model"]["width"], vocab=vocab, layers_per_module=depth // blocks, modules=blocks,
        context=cfg["data"]["context"], t_seq_sid=batch / rate[("seq_sid", s, 1)],
        t_seq_bp=batch / rate[("seq_bp", s, m_bp)], e_sid=e_sid, e_bp=e_bp,
        ratio=head["ratio_equal_update"],
    )  # fmt: skip


def head_share(split: dict[str, Any], vocab: int) -> float:
    """phi: the heads' (d x V matmul) share of a SID stage's V-dependent forward time, the
    rest being the loss over V; from the split's row at `vocab` without top-k."""
    for row in split["rows"]:
        if row["vocab"] == vocab and row["topk"] is None:
            heads = sum(st["heads_ms"] for st in row["stages"])
            loss = sum(st["loss_ms"] for st in row["stages"])
            return heads / (heads + loss)
    raise SystemExit(f"lm_cost_map: the split has no dense row at V = {vocab}")


@dataclass(frozen=True)
class Model:
    d0: int
    context: int
    a_sid: float  # one layer, SID (forward + local backward + step), s per batch at d0
    c_sid: float  # s per batch per vocabulary entry at d0, one module's head and loss
    a_bp: float
    c_bp: float
    phi: float
    e_sid: float
    e_bp: float

    def f(self, d: int) -> float:
        return (d * d + self.context * d / 6) / (self.d0 * self.d0 + self.context * self.d0 / 6)

    def c(self, c0: float, d: int) -> float:
        return c0 * (self.phi * d / self.d0 + 1 - self.phi)

    def t_module(self, d: int, vocab: int, lm: int) -> float:
        return lm * self.a_sid * self.f(d) + vocab * self.c(self.c_sid, d)

    def t_bp(self, d: int, vocab: int, layers: int) -> float:
        return layers * self.a_bp * self.f(d) + vocab * self.c(self.c_bp, d)

    def ratio(self, d: int, vocab: int, lm: int, modules: int, e: float | None = None) -> float:
        """SID / best BP for `modules` modules of `lm` layers (one module per stage), the
        pipelines' efficiencies in the ratio e = e_sid / e_bp (default: the calibration's)."""
        e = self.e_sid / self.e_bp if e is None else e
        return e * self.t_bp(d, vocab, modules * lm) / (modules * self.t_module(d, vocab, lm))


def _line(v: list[float], t: list[float]) -> tuple[float, float]:
    """(intercept, slope) of t against v: the slope between the two largest V (where the
    heads dominate and time is nearly linear in V), the intercept through the smallest V
    (where it is nearly all layers). A least-squares line would let the middle point's
    cache effects move the intercept, and the intercept is what the map extrapolates."""
    slope = (t[-1] - t[-2]) / (v[-1] - v[-2])
    return t[0] - v[0] * slope, slope


def calibrate(runs: list[Run], phi: float) -> Model:
    """The model's constants from runs at one d and one layer per module, differing in V."""
    if len({(r.d, r.layers_per_module, r.modules, r.context) for r in runs}) != 1:
        raise SystemExit("lm_cost_map: calibration runs must differ in V only")
    runs = sorted(runs, key=lambda r: r.vocab)
    if len({r.vocab for r in runs}) < 2:
        raise SystemExit("lm_cost_map: calibration needs runs at two or more V")
    r0 = runs[0]
    v = [float(r.vocab) for r in runs]
    # SID: K modules of Lm layers each; BP: the whole network once
    a_sid, c_sid = _line(v, [r.t_seq_sid / r0.modules for r in runs])
    a_bp, c_bp = _line(v, [r.t_seq_bp for r in runs])
    return Model(
        d0=r0.d, context=r0.context, a_sid=a_sid / r0.layers_per_module, c_sid=c_sid,
        a_bp=a_bp / (r0.modules * r0.layers_per_module), c_bp=c_bp, phi=phi,
        e_sid=sum(r.e_sid for r in runs) / len(runs), e_bp=sum(r.e_bp for r in runs) / len(runs),
    )  # fmt: skip


def report(model: Model, calib: list[Run], valid: list[Run], effs: dict[int, float]) -> str:
    """The measured and modelled ratios, then the map at each S in `effs` (S: e_sid/e_bp)."""
    lines = ["| run | d | V | layers/module | modules | measured | model | error |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind, runs in (("calibration", calib), ("validation", valid)):
        for r in runs:
            pred = model.ratio(r.d, r.vocab, r.layers_per_module, r.modules)
            err = 100 * (pred - r.ratio) / r.ratio
            lines.append(f"| {kind} | {r.d} | {r.vocab} | {r.layers_per_module} | {r.modules} | "
                         f"{r.ratio:.2f} | {pred:.2f} | {err:+.0f}% |")  # fmt: skip
    lines += ["", f"Fitted at d = {model.d0}: a_sid {model.a_sid:.4f} s, a_bp {model.a_bp:.4f} s "
              f"per layer; c_sid {1e6 * model.c_sid:.1f} us, c_bp {1e6 * model.c_bp:.1f} us per "
              f"vocabulary entry; phi {model.phi:.2f}; e_sid {model.e_sid:.2f}, e_bp "
              f"{model.e_bp:.2f} (S = 2).", ""]  # fmt: skip
    vocabs = [256, 2048, 8192, 32768, 131072]
    for s, e in sorted(effs.items()):
        for lm in (1, 4):
            lines += [f"SID / best BP at S = K = {s}, {lm} layer(s) per module, e_sid / e_bp = "
                      f"{e:.2f} (rows d, columns V; bold: >= 1.2):", "",
                      "| d | " + " | ".join(f"V={v}" for v in vocabs) + " |",
                      "|---|" + "---|" * len(vocabs)]  # fmt: skip
            for d in (128, 256, 512, 1024, 2048, 4096):
                cells = [model.ratio(d, v, lm, s, e) for v in vocabs]
                lines.append(f"| {d} | " + " | ".join(
                    f"**{c:.2f}**" if c >= 1.2 else f"{c:.2f}" for c in cells) + " |")  # fmt: skip
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrate", nargs="+", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--validate", nargs="*", type=Path, default=[])
    ap.add_argument(
        "--efficiency",
        nargs="*",
        type=Path,
        default=[],
        help="SIMULATED bench dirs: the pipelines' efficiencies at S = their module count",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    calib = [read_run(p) for p in args.calibrate]
    split = json.loads(args.split.read_text())
    phi = head_share(split, max(r.vocab for r in calib))
    model = calibrate(calib, phi)
    simulated = [json.loads((p / "bench.json").read_text()) for p in args.efficiency]
    effs = map_efficiencies(model.e_sid / model.e_bp, simulated)
    text = report(model, calib, [read_run(p) for p in args.validate], effs)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
