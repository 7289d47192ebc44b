"""The pipeline simulator: torch's action lists, the event replay against closed forms on
hand-made stage times, communication, and one tiny end-to-end run (all in process)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from sidpipe.bench.simulate import (
    StageTimes,
    measure_stage_times,
    replay,
    samples_per_s,
    schedule_actions,
    simulate_sid,
    simulated_rows,
    stages_per_rank,
)
from sidpipe.config import Schedule, compose_config
from sidpipe.data import load_data
from sidpipe.drivers.bp import stage_ids
from sidpipe.models import build_net

ALL_SCHEMES = ["sid", "seq_sid", "seq_bp", *(s.value for s in Schedule)]


def bp_times(n: int, f: float, i: float, w: float, u: float = 0.0, nbytes: int = 0):
    """n equal stages: forward f, input grads i, weight grads w (full backward i + w)."""
    return [StageTimes(0, 0, f, i + w, i, w, u, bp_bytes=nbytes)] * n


def per_batch(schedule: Schedule, ranks: int, m: int, f: float, i: float, w: float, **kw):
    """Seconds per batch with the rank's work (f, i, w) split evenly over its stages."""
    v = 2 if schedule.multi_stage else 1
    orders = schedule_actions(schedule, ranks, m, v)
    return replay(bp_times(ranks * v, f / v, i / v, w / v), orders, **kw)[0]


@pytest.mark.parametrize("schedule", list(Schedule))
@pytest.mark.parametrize("ranks,m", [(2, 4), (4, 8)])
def test_action_lists_hold_every_stage_and_microbatch_once(schedule, ranks, m):
    v = 2 if schedule.multi_stage else 1
    orders = schedule_actions(schedule, ranks, m, v)
    assert not dist.is_initialized()  # the fake process group is gone again
    n = ranks * v
    for r, acts in enumerate(orders):  # the stages of a rank are the ones the runner places
        assert {s for _, s, _ in acts} == set(stage_ids(schedule, r, ranks, v))
    work = sorted((k, s, i) for acts in orders for (k, s, i) in acts)
    fwd = [(s, i) for k, s, i in work if k == "F"]
    assert fwd == [(s, i) for s in range(n) for i in range(m)]
    full = {(s, i) for k, s, i in work if k == "B"}
    split = [(s, i) for k, s, i in work if k == "I"]
    assert split == [(s, i) for k, s, i in work if k == "W"]
    assert len(full) + len(split) == n * m and not full & set(split)
    assert bool(split) == (schedule in (Schedule.interleaved_zb, Schedule.zbv, Schedule.dualpipev))
    for acts in orders:  # W after its own I; each rank forwards a stage in microbatch order
        for k, s, i in acts:
            if k == "W":
                assert acts.index(("I", s, i)) < acts.index(("W", s, i))


def test_1f1b_last_rank_forwards_are_numbered_from_zero():
    # torch's Schedule1F1B.pipeline_order numbers the last rank's forwards 1..M
    last = schedule_actions(Schedule.onef1b, 2, 4)[1]
    assert [i for k, _, i in last if k == "F"] == [0, 1, 2, 3]


def test_schedule_actions_refuses_a_live_process_group():
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        with pytest.raises(RuntimeError, match="without a process group"):
            schedule_actions(Schedule.gpipe, 2, 4)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ranks,m", [(2, 4), (4, 4), (4, 8), (3, 5)])
def test_gpipe_and_1f1b_are_textbook(ranks, m):
    f, b = 1.0, 2.0  # equal stages: (M+S-1) slots of F and of B per batch
    for schedule in (Schedule.gpipe, Schedule.onef1b):
        assert per_batch(schedule, ranks, m, f, b / 2, b / 2) == pytest.approx((m + ranks - 1) * 3)


def test_optimizer_step_once_per_batch_after_the_flush():
    orders = schedule_actions(Schedule.gpipe, 2, 4)
    assert replay(bp_times(2, 1, 1, 1, u=0.5), orders)[0] == pytest.approx(5 * 3 + 0.5)


@pytest.mark.parametrize("ranks,m", [(2, 4), (4, 8), (2, 8)])
def test_interleaved_with_two_stages_per_rank_halves_the_bubble(ranks, m):
    f, b = 1.0, 2.0  # Narayanan et al.: bubble (S-1)(f+b)/v
    want = m * (f + b) + (ranks - 1) * (f + b) / 2
    assert per_batch(Schedule.interleaved_1f1b, ranks, m, f, b / 2, b / 2) == pytest.approx(want)


@pytest.mark.parametrize("ranks,m", [(2, 4), (2, 8), (3, 6), (4, 8), (4, 16)])
@pytest.mark.parametrize("f,i,w", [(1, 1, 1), (1, 2, 2), (1, 0.5, 1.5), (2, 1, 1)])
def test_zero_bubble_schedules_never_slower_than_1f1b(ranks, m, f, i, w):
    one = per_batch(Schedule.onef1b, ranks, m, f, i, w)
    ideal = m * (f + i + w)  # every rank busy all the time
    for schedule in (Schedule.interleaved_zb, Schedule.zbv, Schedule.dualpipev):
        if stages_per_rank(compose_config([]), schedule.value, ranks, m) is None:
            continue
        assert ideal - 1e-9 <= per_batch(schedule, ranks, m, f, i, w) <= one + 1e-9
    assert per_batch(Schedule.interleaved_zb, ranks, m, f, i, w) <= per_batch(
        Schedule.interleaved_1f1b, ranks, m, f, i, w
    )


def test_v_schedules_on_two_ranks():
    # ZBV with F = I = W leaves no bubble in steady state (a batch's ramp fills the
    # previous batch's tail); DualPipeV and 1F1B on the same work for comparison.
    assert per_batch(Schedule.zbv, 2, 4, 1, 1, 1) == pytest.approx(12)
    assert per_batch(Schedule.dualpipev, 2, 4, 1, 1, 1) == pytest.approx(12.5)
    assert per_batch(Schedule.onef1b, 2, 4, 1, 1, 1) == pytest.approx(15)
    # the V keeps the hand-off at its turn on one rank: a slow link costs it nothing there
    slow = {"link": (1.0, 0.0)}  # 1 byte/s
    v_orders = schedule_actions(Schedule.zbv, 2, 4, 2)
    times = [StageTimes(0, 0, 0.5, 1, 0.5, 0.5, 0, bp_bytes=b) for b in (0, 0, 0, 0)]
    assert replay(times, v_orders, **slow)[0] == pytest.approx(12)


def test_communication_off_and_on():
    f, b, xfer, lat = 1.0, 2.0, 0.25, 0.1  # transfer shorter than a step: only the ramps grow
    for ranks in (2, 3):
        orders = schedule_actions(Schedule.gpipe, ranks, 4)
        off = replay(bp_times(ranks, f, b / 2, b / 2, nbytes=100), orders)[0]
        on = replay(bp_times(ranks, f, b / 2, b / 2, nbytes=100), orders, link=(400, lat))[0]
        assert off == pytest.approx((4 + ranks - 1) * (f + b))
        assert on == pytest.approx(off + 2 * (ranks - 1) * (xfer + lat))  # F ramp + B ramp
    # a transfer longer than a forward: the link paces the pipeline
    orders = schedule_actions(Schedule.gpipe, 2, 8)
    slow = replay(bp_times(2, f, 0.05, 0.05, nbytes=300), orders, link=(100, 0.0))[0]
    assert slow > 8 * 3.0


def test_sid_has_no_flush_and_its_link_overlaps():
    f, u, stages, n = 1.0, 3.0, 4, 10
    times = [StageTimes(f, u, 0, 0, 0, 0, 0, sid_bytes=100)] * stages
    ends, events = simulate_sid(times, n)
    assert ends[-1] == pytest.approx(n * (f + u) + (stages - 1) * f)
    assert len(events[0]) == 2 * n
    ends_on, _ = simulate_sid(times, n, link=(100, 0.5))  # 1.5 s per message < f + u
    assert ends_on[-1] == pytest.approx(ends[-1] + (stages - 1) * 1.5)
    assert samples_per_s("sid", times, stages, 64, 4, (100, 0.5)) == pytest.approx(16 / 4.0)
    assert samples_per_s("sid", times, stages, 64, 4, (10, 0.0)) == pytest.approx(16 / 10.0)


def test_slowest_stage_sets_the_rates():
    times = [
        StageTimes(1.0, 1.0, 0.5, 1.0, 0.5, 0.5, 0.0),
        StageTimes(2.0, 2.0, 0.5, 1.0, 0.5, 0.5, 0.0),
    ]
    assert samples_per_s("sid", times, 2, 64, 4) == pytest.approx(16 / 4.0)  # 16 samples / 4 s
    assert samples_per_s("gpipe", times, 2, 64, 4) == pytest.approx(64 / ((4 + 1) * 1.5))
    assert samples_per_s("seq_sid", times, 2, 64, 4) == pytest.approx(16 / 6.0)
    assert samples_per_s("seq_bp", times, 2, 64, 4) == pytest.approx(64 / 12.0)


def test_stages_per_rank_follows_the_config_checks():
    cfg = compose_config([])
    assert stages_per_rank(cfg, "sid", 4, 1) == 1
    assert stages_per_rank(cfg, "gpipe", 4, 1) == 1
    assert stages_per_rank(cfg, "1f1b", 4, 2) is None  # M >= S
    assert stages_per_rank(cfg, "zbv", 4, 2) == 2
    assert stages_per_rank(cfg, "dualpipev", 4, 4) is None  # M >= 2S
    assert stages_per_rank(cfg, "interleaved_1f1b", 4, 6) is None  # M % (M // S)


def tiny(*overrides: str):
    return compose_config(["data=digits", "model=mlp", "model.width=32", "model.depth=4",
                           "model.head_hidden=0", "device=cpu", "bench.mode=simulate",
                           "bench.batch_size=32", *overrides])  # fmt: skip


@pytest.fixture
def one_thread():
    """A stage process runs one thread; two would fight a busy 2-core machine for ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_measured_stage_costs_and_bytes(one_thread):
    cfg = tiny()
    data = load_data(cfg.data, cfg.seed)
    times = measure_stage_times(cfg, data, build_net(cfg, data), torch.device("cpu"), 8, 2, iters=3)
    first, last = times
    assert first.bp_input == 0.0 < first.bp_weight  # torch: stage 0 has no I; W is all of it
    assert last.bp_input > 0 and last.bp_weight > 0
    assert all(t.bp_forward > 0 and t.bp_backward > 0 and t.bp_update > 0 for t in times)
    assert all(t.sid_forward > 0 and t.sid_update > 0 for t in times)
    assert first.bp_bytes == 8 * 32 * 4 and last.bp_bytes == 0 == last.sid_bytes
    assert first.sid_bytes > first.bp_bytes  # h plus the belief and the labels


def test_simulated_rows_every_scheme_in_process():
    cfg = tiny("bench.stages=[2]", "bench.microbatches=[2,4]")
    cfg.bench.schemes = ALL_SCHEMES  # set after the check: the bench may not list them all yet
    affinity = os.sched_getaffinity(0)
    rows = simulated_rows(cfg)
    assert not dist.is_initialized() and os.sched_getaffinity(0) == affinity
    got = {(r["scheme"], r["microbatches"]) for r in rows}
    want = {(s, m) for s in ALL_SCHEMES for m in (2, 4)} - {("dualpipev", 2)}  # M >= 2S
    assert got == want
    for r in rows:
        assert r["simulated"] and r["samples_per_s"] > 0 and r["stages"] == 2
        assert len(r["stage_times_ms"]) == 2 * r["stages_per_rank"]
        assert set(r["stage_times_ms"][0]) >= {"sid_forward", "bp_forward", "bp_backward"}
