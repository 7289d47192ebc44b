"""benchmarks/lm_cost_map.py: the cost model recovers the constants it was built from, reads
a recorded bench run consistently, and behaves as its formula says (falls with V)."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "lm_cost_map.py"
spec = importlib.util.spec_from_file_location("lm_cost_map", SCRIPT)
assert spec is not None and spec.loader is not None
cost_map = importlib.util.module_from_spec(spec)
sys.modules["lm_cost_map"] = cost_map  # its dataclasses look their module up while defined
spec.loader.exec_module(cost_map)

RECORDED = REPO / "benchmarks" / "results" / "lm-vocab-measured-2026-12-03"
TRUTH = cost_map.Model(d0=128, context=128, a_sid=0.09, c_sid=2e-4, a_bp=0.1, c_bp=1.2e-4,
                       phi=0.3, e_sid=0.8, e_bp=0.75)  # fmt: skip


def synthetic_runs(model, vocabs=(256, 2048, 8192), d=128, modules=4):
    """Runs whose sequential times are exactly what `model` says."""
    out = []
    for v in vocabs:
        out.append(cost_map.Run(
            d=d, vocab=v, layers_per_module=1, modules=modules, context=model.context,
            t_seq_sid=modules * model.t_module(d, v, 1), t_seq_bp=model.t_bp(d, v, modules),
            e_sid=model.e_sid, e_bp=model.e_bp, ratio=model.ratio(d, v, 1, modules),
        ))  # fmt: skip
    return out


def test_calibration_recovers_the_constants_it_was_built_from():
    got = cost_map.calibrate(synthetic_runs(TRUTH), TRUTH.phi)
    for field in ("a_sid", "c_sid", "a_bp", "c_bp", "e_sid", "e_bp"):
        assert getattr(got, field) == pytest.approx(getattr(TRUTH, field), rel=1e-9), field
    # and so predicts the ratio anywhere the truth does, other widths and depths included
    for d, v, lm in ((512, 32768, 2), (2048, 256, 8), (128, 8192, 1)):
        assert got.ratio(d, v, lm, 4) == pytest.approx(TRUTH.ratio(d, v, lm, 4), rel=1e-9)


def test_the_ratio_falls_with_the_vocabulary_and_rises_with_the_width():
    ratios = [TRUTH.ratio(256, v, 1, 4) for v in (256, 2048, 8192, 32768)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > ratios[-1]
    widths = [TRUTH.ratio(d, 8192, 1, 4) for d in (128, 512, 2048)]
    assert widths == sorted(widths)
    # e is the pipelines' efficiency ratio: the ratio scales with it
    assert TRUTH.ratio(256, 2048, 1, 4, e=2.0) == pytest.approx(
        2.0 / (TRUTH.e_sid / TRUTH.e_bp) * TRUTH.ratio(256, 2048, 1, 4)
    )


def test_calibration_refuses_runs_that_differ_in_more_than_the_vocabulary():
    runs = synthetic_runs(TRUTH)
    runs[1] = replace(runs[1], d=256)
    with pytest.raises(SystemExit, match="differ in V only"):
        cost_map.calibrate(runs, 0.3)
    with pytest.raises(SystemExit, match="two or more V"):
        cost_map.calibrate(synthetic_runs(TRUTH, vocabs=(2048,)), 0.3)


@pytest.mark.skipif(not (RECORDED / "bench-v8192" / "bench.json").exists(), reason="no record")
def test_a_recorded_run_reads_back_its_own_headline():
    b = json.loads((RECORDED / "bench-v8192" / "bench.json").read_text())
    run = cost_map.read_run(RECORDED / "bench-v8192")
    assert (run.d, run.vocab, run.modules, run.layers_per_module) == (128, 8192, 4, 1)
    head = b["headline"][0]
    assert run.ratio == head["ratio_equal_update"]
    # the ratio is e_sid / e_bp times the sequential ratio, by the definition of e
    assert run.e_sid / run.e_bp * run.t_seq_bp / run.t_seq_sid == pytest.approx(run.ratio)


def test_the_map_takes_each_simulation_only_at_s_equal_to_its_module_count():
    """The map is of S = K pipelines: the 8-module simulation's S = 4 point (two modules
    per stage) must not enter the S = 4 map, only its S = 8 point the S = 8 map."""
    four = json.loads((RECORDED / "simulated-v256" / "bench.json").read_text())
    eight = json.loads((RECORDED / "simulated-v256-8modules" / "bench.json").read_text())
    effs = cost_map.map_efficiencies(0.97, [four, eight])
    e4, e8 = cost_map.efficiencies(four), cost_map.efficiencies(eight)
    assert set(effs) == {2, 4, 8} and effs[2] == 0.97
    assert effs[4] == pytest.approx(e4[4][0] / e4[4][1])
    assert effs[8] == pytest.approx(e8[8][0] / e8[8][1])
    assert effs[4] != pytest.approx(e8[4][0] / e8[4][1])
