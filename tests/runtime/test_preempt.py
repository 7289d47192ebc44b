"""The preemption cut (runtime/cadence.py `preemptible`) and the request it acts on
(runtime/preempt.py), in process: where a preempted run saves and stops."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist

from sidpipe.config import TrainConfig
from sidpipe.runtime.cadence import EventKind, cadence, preemptible
from sidpipe.runtime.preempt import Preemption


def events(stop_at: int | None, start: tuple[int, int, int] = (0, 0, 0), saved: int = 0):
    """4 batches per epoch, 3 epochs, a checkpoint every 4 steps; stop before step stop_at+1."""
    train = TrainConfig(epochs=3, eval_every_epoch=False, final_eval=False)
    evs = cadence(train, 4, 12, start, lambda epoch, first: [(None, None)] * (4 - first))
    out = preemptible(evs, lambda done: done == stop_at, saved)
    return [(e.kind, e.step, e.epoch, e.batch) for e in out if e.kind is not EventKind.TRAIN]


def test_a_preemption_saves_the_steps_done_then_stops():
    ev = events(6)
    assert ev[-2:] == [(EventKind.CHECKPOINT, 6, 1, 2), (EventKind.PREEMPT, 6, 1, 0)]
    assert all(k is not EventKind.STOP for k, *_ in ev)


def test_no_second_checkpoint_where_one_was_just_saved():
    ev = events(8)  # the periodic checkpoint after step 8 holds it already
    assert [e for e in ev if e[0] is EventKind.CHECKPOINT] == [
        (EventKind.CHECKPOINT, 4, 0, 4), (EventKind.CHECKPOINT, 8, 1, 4)]  # fmt: skip
    assert ev[-1] == (EventKind.PREEMPT, 8, 2, 0)


def test_nothing_to_save_at_the_start_or_the_resume_point():
    assert events(0) == [(EventKind.PREEMPT, 0, 0, 0)]
    assert events(5, start=(5, 1, 1), saved=5) == [(EventKind.PREEMPT, 5, 1, 0)]


def test_unrequested_runs_to_the_end():
    assert events(None)[-1][0] is EventKind.STOP


def test_a_signal_sets_the_request_and_publishes_it():
    store = dist.HashStore()
    mine, peer = Preemption(store).install(), Preemption(store, poll_s=0.0)
    try:
        assert not mine.requested() and not peer.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mine.requested() and mine.signame == "SIGUSR1"
        assert peer.requested() and peer.signame == "SIGUSR1"  # through the store
    finally:
        mine.uninstall()


def test_bp_ranks_agree_on_the_step():
    store = dist.HashStore()
    first, other = Preemption(store, poll_s=0.0), Preemption(store, poll_s=0.0)
    first.signum = signal.SIGTERM
    assert not first.agreed(10)  # proposes 12
    other.signum = signal.SIGTERM
    assert not other.agreed(11) and other.agreed(12) and first.agreed(12)
