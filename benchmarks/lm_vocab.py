"""Where a SID language model's time and wire bytes go as the vocabulary grows.

For V = 256 (bytes) and byte-level BPEs of 2048 and 8192 tokens (data.tokenizer=bpe,
trained on the training split and cached), the small preset model (experiment=lm_small:
4 decoder layers of width 128, context 128, batch 32) is cut into pipeline.stages stages,
and each stage's training step is timed in one process, one torch thread, split into

  blocks   the decoder layers' forward
  heads    the belief heads' forward (U LN(h) + g log p: O(dV) per position)
  loss     the SID loss of every module and the softmax that makes its belief (O(V))
  update   local backward and optimizer step of the stage's modules
  wire     packing the outgoing belief for the wire and rebuilding the incoming one
           (top-k only: the dense path moves the tensor as it is)

the same code the pipeline runs (SIDLearner.update, drivers/sid.py to_wire / from_wire, the
forward of SIDLearner._forward with timers between its parts). Bytes per token on the wire
are counted by the loopback transport (as Transport counts them: header + h + p + y) for a
TRAIN message, dense and with pipeline.belief_topk=k; bytes per byte of text divide by the
mean bytes a token of the training split stands for.

Usage (from the repository root; SIDPIPE_DATA or --data-root must hold shakespeare/):
  .venv/bin/python benchmarks/lm_vocab.py --out DIR [--vocabs 256,2048,8192] [--topk 32]
      [--steps 20 --warmup 3] [--stages 2] [overrides for a smaller model: --width 32 ...]
Writes DIR/lm_vocab.json and DIR/lm_vocab.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sidpipe.config import Config, compose_config
from sidpipe.data import DataBundle, load_data, train_batches
from sidpipe.method.learner import SIDLearner
from sidpipe.method.loss import sid_loss
from sidpipe.models import build_net
from sidpipe.models.heads import sparse_prior
from sidpipe.models.partition import stage_modules
from sidpipe.runtime.transport import Kind, LoopbackTransport, Message
from sidpipe.runtime.wire import from_wire, to_wire

PARTS = ("blocks", "heads", "loss", "update", "wire")


def config(args: argparse.Namespace, vocab: int, topk: int | None) -> Config:
    tok = ["data.tokenizer=bytes"] if vocab == 256 else ["data.tokenizer=bpe",
                                                         f"data.vocab_size={vocab}"]  # fmt: skip
    small = [f"model.{k}={v}" for k, v in (("width", args.width), ("depth", args.depth),
                                           ("heads", args.heads)) if v is not None]  # fmt: skip
    more = [f"data.context={args.context}"] if args.context else []
    more += [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    more += [f"data.root={args.data_root}"] if args.data_root else []
    more += [f"pipeline.belief_topk={topk}"] if topk else []
    return compose_config(["experiment=lm_small", f"pipeline.stages={args.stages}", *tok,
                           *small, *more, "progress=false", "device=cpu"])  # fmt: skip


class Clock:
    """Adds the time since the last mark to one part."""

    def __init__(self) -> None:
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.t = time.perf_counter()

    def mark(self, part: str) -> None:
        now = time.perf_counter()
        self.parts[part] += now - self.t
        self.t = now


def stage_step(learner: SIDLearner, h: Tensor, p: Tensor, y: Tensor, clock: Clock) -> tuple:
    """SIDLearner.forward + update with a timer between the parts (the same operations as
    SIDLearner._forward: stop-gradients, compression between modules, fp32 beliefs)."""
    sid, module = learner.cfg.sid, learner.stage
    losses = []
    module.train()
    for i, (block, head) in enumerate(zip(module.blocks, module.heads)):
        if i:
            p = sparse_prior(p, module.belief_topk)
            clock.mark("wire")
        h = block(h.detach())
        clock.mark("blocks")
        z = head(h, p.detach())
        clock.mark("heads")
        sent_k = learner.sent_k if i or learner.first else None
        losses.append(sid_loss(z, y, p, sid.alpha, sid.kl_direction, sid.label_smoothing, sent_k))
        p = F.softmax(z.float(), dim=-1).detach()
        clock.mark("loss")
    learner.update(losses)
    clock.mark("update")
    return h.detach(), p


def wire_bytes(msg: Message, topk: int | None) -> int:
    """Bytes the transport counts for one message (header + tensors), as sent."""
    links = LoopbackTransport.links(2)
    tx = LoopbackTransport(0, links, 5.0)
    tx.send(to_wire(msg, False, topk))
    return tx.stats.bytes_forward


def measure(
    args: argparse.Namespace, vocab: int, topk: int | None, data: DataBundle, load_s: float
) -> dict[str, Any]:
    cfg = config(args, vocab, topk)
    net = build_net(cfg, data)
    learners = [SIDLearner(m, cfg, 1000, torch.device("cpu"))
                for m in stage_modules(net, cfg.pipeline.stages)]  # fmt: skip
    batches = train_batches(cfg, data).epoch(0)
    per_stage: list[list[dict[str, float]]] = [[] for _ in learners]
    msg_bytes: list[int] = []
    for step in range(args.warmup + args.steps):
        x, y = next(batches)
        h, p = x, net.prior(x).float()
        for r, learner in enumerate(learners):
            clock = Clock()
            if r:  # what stage r reads: the previous stage's message, through the codec
                msg = from_wire(to_wire(Message(Kind.TRAIN, step, 0, h, p, y), False, topk),
                                False, True, topk, data.num_classes)  # fmt: skip
                h, p = msg.h, msg.p
                clock.mark("wire")
            h, p = stage_step(learner, h, p, y, clock)
            if r < len(learners) - 1:
                out = Message(Kind.TRAIN, step, 0, h, p, y)
                if step == 0:
                    msg_bytes.append(wire_bytes(out, topk))
                if topk:  # the sender's half of the wire cost: the packing
                    to_wire(out, False, topk)
                    clock.mark("wire")
            if step >= args.warmup:
                per_stage[r].append({k: v * 1e3 for k, v in clock.parts.items()})
    positions = x.numel()
    tok = data.tokenizer
    assert tok is not None
    train = data.train.data.long()
    bytes_per_token = float(tok.token_bytes[train].sum()) / train.numel()
    stage_rows = []
    for r, rows in enumerate(per_stage):
        med = {k: statistics.median(row[k] for row in rows) for k in PARTS}
        stage_rows.append({"stage": r, "modules": list(learners[r].stage.block_range),
                           **{f"{k}_ms": v for k, v in med.items()},
                           "total_ms": sum(med.values())})  # fmt: skip
    wire = msg_bytes[0] if msg_bytes else 0
    return {
        "vocab": vocab, "tokenizer": tok.kind, "topk": topk, "positions_per_message": positions,
        "text_bytes_per_token": bytes_per_token, "data_load_s": load_s,
        "stages": stage_rows,
        "wire_bytes_per_message": wire,
        "wire_bytes_per_token": wire / positions,
        "wire_bytes_per_text_byte": wire / positions / bytes_per_token,
        "head_params": sum(p.numel() for h in net.heads for p in h.parameters()),
        "block_params": sum(p.numel() for b in net.blocks for p in b.parameters()),
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| V | tokenizer | topk | stage | blocks ms | heads ms | loss ms | update ms | "
             "wire ms | total ms | wire B/token | wire B/text byte |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for s in r["stages"]:
            wire = (f"{r['wire_bytes_per_token']:.0f} | {r['wire_bytes_per_text_byte']:.0f}"
                    if s["stage"] == 0 and len(r["stages"]) > 1 else "- | -")  # fmt: skip
            lines.append(
                f"| {r['vocab']} | {r['tokenizer']} | {r['topk'] or '-'} | {s['stage']} | "
                + " | ".join(f"{s[k + '_ms']:.2f}" for k in PARTS)
                + f" | {s['total_ms']:.2f} | {wire} |"
            )
    return "\n".join(lines)


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {model}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocabs", default="256,2048,8192")
    ap.add_argument("--topk", type=int, default=32, help="pipeline.belief_topk to compare")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=None)
    # a smaller model than the preset, for smoke runs (None: experiment=lm_small's)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        cfg = config(args, vocab, None)
        t0 = time.perf_counter()
        data = load_data(cfg.data, cfg.seed)  # a BPE: trained on the training split, cached
        load_s = time.perf_counter() - t0
        for topk in (None, args.topk):
            rows.append(measure(args, vocab, topk, data, load_s))
            r = rows[-1]
            print(f"V={vocab} topk={topk}: stage totals "
                  f"{[round(s['total_ms'], 2) for s in r['stages']]} ms, "
                  f"{r['wire_bytes_per_token']:.0f} B/token on the wire", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{machine()}, {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "lm_vocab.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    (args.out / "lm_vocab.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
