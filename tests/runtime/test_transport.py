"""The message transport between two real gloo processes (1 thread each, bounded waits)."""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sidpipe.runtime.transport import HEADER_LEN, Kind, Message, Transport


def _messages() -> list[Message]:
    """Every kind, and shapes that change between messages (a partial batch, an eval split)."""
    g = torch.Generator().manual_seed(0)

    def train(step: int, n: int) -> Message:
        return Message(
            Kind.TRAIN, step, 0, torch.randn(n, 3, 5, generator=g), torch.rand(n, 4, generator=g),
            torch.randint(0, 4, (n,), generator=g),
        )  # fmt: skip

    p6, y6 = torch.rand(6, 4, generator=g), torch.ones(6, dtype=torch.int64)
    return [
        train(0, 8),
        train(1, 8),
        train(2, 3),
        Message(Kind.EVAL, 3, 0, torch.randn(6, 3, 5, generator=g), p6, y6, split=1),
        Message(Kind.EVAL_END, 3, 0, torch.arange(4, dtype=torch.int64).view(2, 2), split=1),
        Message(Kind.EPOCH_END, 3, 0),
        Message(Kind.STOP, 3, 1),
    ]


def _same(a: Message, b: Message) -> bool:
    fields = ("kind", "step", "epoch", "split")
    if any(getattr(a, f) != getattr(b, f) for f in fields):
        return False
    pairs = [(a.h, b.h), (a.p, b.p), (a.y, b.y)]
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in pairs
    )


def _worker(rank: int, init: str, host_headers: bool, out: Path) -> None:
    try:
        torch.set_num_threads(1)
        timeout = timedelta(seconds=30)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timeout)
        side = dist.new_group(backend="gloo", timeout=timeout) if host_headers else None
        transport = Transport(rank, 2, torch.device("cpu"), 2, False, header_group=side)
        sent = _messages()
        if rank == 0:
            for msg in sent:
                transport.send(msg)
            transport.flush()
        else:
            rest = sent
            if host_headers:
                # The first header must arrive on the side group, not on the payloads' group.
                hdr = torch.empty(HEADER_LEN, dtype=torch.int64)
                dist.recv(hdr, 0, group=side)
                assert hdr[0] == Kind.TRAIN and hdr[5:8].tolist() == [8, 3, 5], hdr
                h, p, y = torch.empty(8, 3, 5), torch.empty(8, 4), torch.empty(8).long()
                for t in (h, p, y):
                    dist.recv(t, 0)
                assert _same(Message(Kind.TRAIN, 0, 0, h, p, y), sent[0])
                rest = sent[1:]
            for want in rest:
                got = transport.recv()
                assert _same(got, want), f"{want.kind.name} step {want.step} differs"
        dist.barrier()
        dist.destroy_process_group()
        (out / f"ok{rank}").write_text("")
    except BaseException:
        (out / f"err{rank}").write_text(traceback.format_exc())
        raise


def _run(host_headers: bool, tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.start_processes(
        _worker, args=(init, host_headers, tmp_path), nprocs=2, join=False, start_method="spawn"
    )
    for p in ctx.processes:
        p.join(90)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    errors = "\n".join(f.read_text() for f in sorted(tmp_path.glob("err*")))
    assert not alive, f"transport test hung\n{errors}"
    assert not errors, errors
    assert sorted(f.name for f in tmp_path.glob("ok*")) == ["ok0", "ok1"]


@pytest.mark.multiprocess
def test_messages_arrive_whole_and_in_order(tmp_path):
    _run(False, tmp_path)


@pytest.mark.multiprocess
def test_host_headers_travel_on_their_own_group(tmp_path):
    """pipeline.host_headers: headers on a gloo side group, payloads on the main group."""
    _run(True, tmp_path)
