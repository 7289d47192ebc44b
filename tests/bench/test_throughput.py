"""`sidpipe bench` end to end on a tiny configuration: JSON, table and plots, consistent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_clean

pytestmark = pytest.mark.timeout(600)


def git_status() -> str:
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
    return r.stdout


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    """Run from a directory outside the checkout, with no bench.out_dir: the results go to
    the bench's run directory (hydra.run.dir) and the source tree is left as it was."""
    out = tmp_path_factory.mktemp("bench")
    before = git_status()
    cmd = [
        sys.executable,
        "-m",
        "sidpipe.cli",
        "bench",
        "data=digits",
        "model=mlp",
        "model.width=64",
        "model.depth=4",
        "pipeline.threads=1",
        "progress=false",
        "bench.stages=[2]",
        "bench.microbatches=[2]",
        # a one-stage and a multi-stage (V) schedule, and one whose constraint M >= 2S fails
        "bench.schemes=[sid,gpipe,1f1b,zbv,dualpipev,seq_sid,seq_bp]",
        "bench.batch_size=64",
        "bench.steps=8",
        "bench.warmup=2",
        "bench.windows=2",
        f"hydra.run.dir={out}",
    ]
    r = run_clean(cmd, out, timeout=540, cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert git_status() == before, "sidpipe bench wrote into the source tree"
    return out, json.loads((out / "bench.json").read_text()), r.stdout


@pytest.mark.multiprocess
def test_outputs_exist(bench_result):
    out, result, stdout = bench_result
    for name in (
        "bench.json",
        "bench.md",
        "samples_per_s_vs_stages.png",
        "samples_per_s_vs_microbatches.png",
        "stage_utilisation.png",
        "timeline_sid_S2_M2.png",
        "timeline_gpipe_S2_M2.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert "sidpipe bench" in result["command"] and result["versions"]["torch"]
    assert "| SID pipeline | 2 | 2 |" in stdout


@pytest.mark.multiprocess
def test_headline_is_sid_at_equal_update_size_against_the_fastest_bp(bench_result):
    out, result, stdout = bench_result
    ran = [r for r in result["rows"] if "samples_per_s" in r]
    bp = [r for r in ran if r["scheme"] in ("gpipe", "1f1b", "zbv")]
    assert {r["scheme"] for r in bp} == {"gpipe", "1f1b", "zbv"}
    best = max(bp, key=lambda r: r["samples_per_s"])
    sid_equal = next(r for r in ran if r["scheme"] == "sid" and r["microbatches"] == 1)
    assert sid_equal["batch_size"] == 64  # one message = B: one update per B samples, as BP
    fastest_sid = max((r for r in ran if r["scheme"] == "sid"), key=lambda r: r["samples_per_s"])
    (h,) = result["headline"]
    assert h["best_bp"] == {"schedule": best["scheme"], "microbatches": best["microbatches"],
                            "samples_per_s": best["samples_per_s"]}  # fmt: skip
    assert h["ratio_equal_update"] == pytest.approx(
        sid_equal["samples_per_s"] / best["samples_per_s"])  # fmt: skip
    assert h["ratio_fastest"] == pytest.approx(
        fastest_sid["samples_per_s"] / best["samples_per_s"])  # fmt: skip
    report = (out / "bench.md").read_text()
    assert f"| 2 | {best['scheme']}, M={best['microbatches']} |" in report
    assert f"**{h['ratio_equal_update']:.2f}**" in report and "Held equal" in report
    # the schedule whose constraint fails is listed, with the reason, not run
    (skipped,) = [r for r in result["rows"] if r.get("skipped")]
    assert skipped["scheme"] == "dualpipev" and "microbatches >= 2 * pipeline.stages" in report
    zbv = next(r for r in ran if r["scheme"] == "zbv")
    assert zbv["stages_per_rank"] == 2 and zbv["bytes_backward_per_sample"] > 0


@pytest.mark.multiprocess
def test_numbers_consistent(bench_result):
    _, result, _ = bench_result
    rows = {r["scheme"]: r for r in result["rows"] if "samples_per_s" in r
            and r["microbatches"] == 2}  # fmt: skip
    assert set(rows) == {"sid", "gpipe", "1f1b", "zbv", "seq_sid", "seq_bp"}
    for r in rows.values():
        assert r["samples_per_s"] > 0
        assert r["samples_per_s_min"] <= r["samples_per_s"] <= r["samples_per_s_max"]
        for st in r["per_stage"]:
            assert 0 <= st["busy"] <= 1.0001 and 0 <= st["recv_wait"] <= 1.0001
            assert 0 <= st["recv"] <= 1.0001
            assert st["busy"] + st["recv_wait"] + st["recv"] + st["send_wait"] <= 1.0001
    s0, s1 = rows["sid"]["per_stage"]
    assert s0["recv"] == 0 < s1["recv"]  # only a receiving stage moves payloads in
    sid = rows["sid"]
    assert sid["ratio_vs_gpipe"] == pytest.approx(
        sid["samples_per_s"] / rows["gpipe"]["samples_per_s"]
    )
    assert sid["ratio_vs_1f1b"] == pytest.approx(
        sid["samples_per_s"] / rows["1f1b"]["samples_per_s"]
    )
    assert sid["efficiency"] == pytest.approx(
        sid["samples_per_s"] / (2 * rows["seq_sid"]["samples_per_s"])
    )
    assert rows["gpipe"]["efficiency"] == pytest.approx(
        rows["gpipe"]["samples_per_s"] / (2 * rows["seq_bp"]["samples_per_s"])
    )
    assert rows["gpipe"]["textbook_bubble"] == pytest.approx(1 / 3)
    assert sid["bytes_backward_per_sample"] == 0
    assert (
        rows["gpipe"]["bytes_backward_per_sample"] > 0
        and rows["1f1b"]["bytes_backward_per_sample"] > 0
    )
    assert sid["bytes_forward_per_sample"] > 0


@pytest.mark.multiprocess
def test_time_to_accuracy_mode(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "sidpipe.cli",
        "bench",
        "mode=tta",
        "target_accuracy=0.8",
        "schemes=[sid,gpipe]",
        "bench.lrs=[0.001,0.003]",
        "data=digits",
        "model=mlp",
        "model.width=64",
        "progress=false",
        "bench.batch_size=64",
        "bench.microbatches=[2]",
        "bench.eval_every=5",
        "max_epochs=3",
        f"bench.out_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}/hydra",
    ]
    r = run_clean(cmd, tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]
    # SID at equal update size (one message = B), BP at M=2; two learning rates each
    assert sorted((x["scheme"], x["microbatches"], x["lr"]) for x in rows) == [
        ("gpipe", 2, 0.001),
        ("gpipe", 2, 0.003),
        ("sid", 1, 0.001),
        ("sid", 1, 0.003),
    ]
    for row in rows:
        evals = row["evaluations"]
        assert len(evals) >= 3 and all("val_per_depth" in e and "train_s" in e for e in evals)
        hit = next(e for e in evals if e["val_per_depth"][-1] >= 0.8)  # the first one reaching it
        assert row["tta_train_s"] == hit["train_s"] and row["tta_step"] == hit["step"]
    for sel in result["lr_selection"]:  # the rate chosen on validation, never on test
        mine = [x for x in rows if x["scheme"] == sel["scheme"]]
        best = max(mine, key=lambda x: x["best_val_accuracy"])
        assert sel["chosen"]["lr"] == best["lr"] and len(sel["sweep"]) == 2
    report = (tmp_path / "bench.md").read_text()
    assert "Time to validation accuracy >= 0.8" in report and "The whole sweep" in report


@pytest.mark.multiprocess
def test_optimizer_contention_script(tmp_path):
    script = REPO / "benchmarks" / "optimizer_contention.py"
    cmd = [sys.executable, str(script), "--procs", "1", "--iters", "2"]
    r = run_clean(cmd, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    row = [line for line in r.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(row) == 1 and float(row[0].split("|")[2]) > 0  # an Adam step took time
    r = run_clean([*cmd[:3], "999"], tmp_path, timeout=60)
    assert r.returncode != 0 and "needs 999 cores" in r.stderr


@pytest.mark.multiprocess
def test_simulate_mode_is_labelled_and_consistent(tmp_path):
    cmd = [sys.executable, "-m", "sidpipe.cli", "bench", "mode=simulate", "data=digits",
           "model=mlp", "model.width=64", "bench.batch_size=64", "bench.microbatches=[2]",
           "pipeline.partition=auto",  # balanced per S on this device, as a run would be
           f"bench.out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra"]  # fmt: skip
    r = run_clean(cmd, tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["scheme"]: x for x in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert all(row["simulated"] for row in rows.values())
    sid, gpipe = rows["sid"], rows["gpipe"]
    assert sid["efficiency"] == pytest.approx(
        sid["samples_per_s"] / (2 * rows["seq_sid"]["samples_per_s"])
    )
    assert sid["ratio_vs_gpipe"] == pytest.approx(sid["samples_per_s"] / gpipe["samples_per_s"])
    report = (tmp_path / "bench.md").read_text()
    assert "**SIMULATED**" in report
    (cut,) = sid["partition"]  # S=2, 4 blocks: one measured cut
    assert isinstance(cut, int) and 1 <= cut <= 3 and f"cuts [{cut}]" in report
    # the GPU target's metric, per stage: SID step / BP forward+backward
    for i, t in enumerate(sid["stage_times_ms"]):
        ratio = (t["sid_forward"] + t["sid_update"]) / (t["bp_forward"] + t["bp_backward"])
        assert f"stage {i}: " in report and f"step ratio {ratio:.2f}" in report
