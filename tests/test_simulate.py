"""The pipeline event simulation against closed forms on synthetic stage times."""

from __future__ import annotations

import pytest

from sidpipe.bench.simulate import (
    StageTimes,
    _run_ops,
    gpipe_order,
    onef1b_order,
    simulate,
    simulate_sid,
)


@pytest.mark.parametrize("stages,m", [(2, 4), (4, 4), (4, 8), (3, 5)])
def test_gpipe_and_1f1b_makespan_is_textbook(stages, m):
    f, b = 1.0, 2.0
    times = [StageTimes(0, 0, f, b, 0.0)] * stages
    want = (m + stages - 1) * (f + b)  # balanced stages: (M+S-1) slots of F and of B
    assert _run_ops(times, gpipe_order(stages, m))[0] == pytest.approx(want)
    assert _run_ops(times, onef1b_order(stages, m))[0] == pytest.approx(want)


def test_sid_has_no_flush():
    f, u, stages, n = 1.0, 3.0, 4, 10
    times = [StageTimes(f, u, 0, 0, 0)] * stages
    makespan, events = simulate_sid(times, n)
    assert makespan == pytest.approx(n * (f + u) + (stages - 1) * f)
    assert len(events[0]) == 2 * n


def test_slowest_stage_sets_sid_rate_and_ratio():
    times = [StageTimes(1.0, 1.0, 0.5, 1.0, 0.0), StageTimes(2.0, 2.0, 0.5, 1.0, 0.0)]
    r = simulate(times, batch=64, m=4, batches=200)
    assert r["sid_samples_per_s"] == pytest.approx(
        16 / 4.0, rel=0.01
    )  # one 16-sample message per 4 s
    assert r["gpipe_samples_per_s"] == pytest.approx(64 / ((4 + 1) * 1.5))
