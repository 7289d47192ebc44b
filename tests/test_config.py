"""Config validation: bad values fail early with one line naming the key."""

from __future__ import annotations

import os

import pytest
import torch

from sidpipe.bench import throughput
from sidpipe.config import (
    Config,
    DataConfig,
    Method,
    ModelConfig,
    PipelineConfig,
    Schedule,
    SIDConfig,
    TrainConfig,
    Variant,
    compose_config,
)
from sidpipe.errors import ConfigError
from sidpipe.runtime.device import set_threads, stage_threads
from tests.conftest import run_cli

# a misspelt key: one line naming it and the nearest valid key
TYPO_LINE = "unknown key 'train.batch_sise' (did you mean 'train.batch_size'?)"


def bp(batch: int = 64, **pipeline) -> Config:
    return Config(method=Method.bp, pipeline=PipelineConfig(stages=2, **pipeline),
                  train=TrainConfig(batch_size=batch))  # fmt: skip


def test_multi_stage_schedules_default_to_two_stages_per_rank():
    for schedule in Schedule:
        cfg = bp(schedule=schedule, microbatches=4)
        assert cfg.pipeline.stages_per_rank == (2 if schedule.multi_stage else 1)
        assert cfg.stage_count == 2 * cfg.pipeline.stages_per_rank
    assert Config(pipeline=PipelineConfig(stages=2)).stage_count == 2  # SID: one per rank


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: ModelConfig(name="resnet99"), "model.name='resnet99' is unknown"),
        (lambda: DataConfig(name="imagenet"), "data.name='imagenet' is unknown"),
        (lambda: TrainConfig(batch_size=0), "train.batch_size must be >= 1"),
        (lambda: TrainConfig(epochs=-1), "train.epochs must be >= 1"),
        (lambda: PipelineConfig(stages=0), "pipeline.stages must be >= 1"),
        (lambda: SIDConfig(alpha=1.5), "sid.alpha must be in [0, 1]"),
        (lambda: DataConfig(label_noise=1.0), "data.label_noise must be in [0, 1)"),
        (
            lambda: Config(pipeline=PipelineConfig(stages=3, partition=[1])),
            "must list 2 cut points (one fewer than the 3 pipeline stages)",
        ),
        (
            lambda: Config(method=Method.bp, pipeline=PipelineConfig(stages=2, microbatches=3)),
            "train.batch_size=64 is not divisible by pipeline.microbatches=3",
        ),
        (
            lambda: Config(
                method=Method.bp,
                pipeline=PipelineConfig(stages=4, microbatches=2, schedule=Schedule.onef1b),
            ),
            "1f1b needs pipeline.microbatches >= pipeline.stages",
        ),
        (
            lambda: Config(
                sid=SIDConfig(variant=Variant.shared), pipeline=PipelineConfig(stages=2)
            ),
            "cannot be pipelined",
        ),
        (
            lambda: Config(method=Method.bp, pipeline=PipelineConfig(stages=2, host_headers=True)),
            "pipeline.host_headers=true applies to SID pipelines",
        ),
        (
            lambda: bp(schedule=Schedule.zbv, stages_per_rank=3),
            "pipeline.schedule=zbv places exactly 2 stages per rank in a V",
        ),
        (
            lambda: bp(schedule=Schedule.dualpipev, microbatches=2),
            "pipeline.schedule=dualpipev needs pipeline.microbatches >= 2 * pipeline.stages",
        ),
        (
            lambda: bp(schedule=Schedule.interleaved_1f1b, microbatches=5, batch=60),
            "needs pipeline.microbatches to be a multiple of its rounds max(1, M // S) = 2",
        ),
        (
            lambda: bp(schedule=Schedule.gpipe, stages_per_rank=2),
            "pipeline.schedule=gpipe runs one stage per rank",
        ),
        (
            lambda: Config(pipeline=PipelineConfig(stages=2, stages_per_rank=2)),
            "pipeline.stages_per_rank applies to BP pipelines",
        ),
        (
            lambda: bp(schedule=Schedule.looped_bfs, stages_per_rank=2, partition=[1, 2]),
            "must list 3 cut points (one fewer than the 4 pipeline stages)",
        ),
    ],
)
def test_validation_messages(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=resnet99"], "unknown option 'model=resnet99' (did you mean 'model=resnet18'?"),
        (["data=imagenet"], "unknown option 'data=imagenet' (choose one of cifar10, cifar100,"),
        (["model.name=resnet99"], "model.name='resnet99' is unknown"),
        (["train.batch_size=-4"], "train.batch_size must be >= 1"),
        (["train.batch_sise=4"], TYPO_LINE),
        (["+train.batch_sise=4"], TYPO_LINE),
        (["method=backprop"], "method"),
        (["pipeline.stages=0"], "pipeline.stages must be >= 1"),
        (["model=custom"], "model=custom needs model.target"),
    ],
)
def test_overrides_fail_in_one_line(overrides, message):
    """In process: the overrides composed exactly as `sidpipe train` composes them."""
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.batch_sise=4"], TYPO_LINE),
        (["model.name=resnet99"], "model.name='resnet99' is unknown"),
        (
            ["data=mnist", "data.root=/nonexistent/sidpipe-data"],
            "/nonexistent/sidpipe-data/MNIST/raw",
        ),
    ],
)
def test_cli_bad_input_exits_nonzero_with_reason(overrides, message, tmp_path):
    """The real CLI turns each kind of error (hydra's, the schema's, the data's) into one
    line and a non-zero exit, without a traceback."""
    r = run_cli(["pipeline.stages=1", *overrides], tmp_path, timeout=60)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-1500:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=inf", "optim.lr must be a finite number > 0 (got inf)"),
        ("optim.lr=nan", "optim.lr must be a finite number > 0 (got nan)"),
        ("optim.lr=-inf", "optim.lr must be a finite number > 0 (got -inf)"),
        ("optim.momentum=-0.5", "optim.momentum must be in [0, 1) (got -0.5)"),
        ("optim.momentum=nan", "optim.momentum must be in [0, 1) (got nan)"),
        ("optim.momentum=1.5", "optim.momentum must be in [0, 1) (got 1.5)"),
        ("optim.weight_decay=-1", "optim.weight_decay must be a finite number >= 0 (got -1.0)"),
        ("optim.weight_decay=nan", "optim.weight_decay must be a finite number >= 0 (got nan)"),
        ("optim.weight_decay=inf", "optim.weight_decay must be a finite number >= 0 (got inf)"),
        (
            "pipeline.auto_bandwidth_gbs=0",
            "pipeline.auto_bandwidth_gbs must be a finite number > 0",
        ),
        (
            "pipeline.auto_bandwidth_gbs=-1",
            "pipeline.auto_bandwidth_gbs must be a finite number > 0",
        ),
        (
            "pipeline.auto_bandwidth_gbs=nan",
            "pipeline.auto_bandwidth_gbs must be a finite number > 0",
        ),
        (
            "pipeline.auto_bandwidth_gbs=inf",
            "pipeline.auto_bandwidth_gbs must be a finite number > 0",
        ),
        ("pipeline.timeout_s=inf", "pipeline.timeout_s must be a finite number of seconds > 0"),
        ("pipeline.timeout_s=nan", "pipeline.timeout_s must be a finite number of seconds > 0"),
        ("pipeline.timeout_s=-1", "pipeline.timeout_s must be a finite number of seconds > 0"),
        ("pipeline.timeout_s=1e300", "pipeline.timeout_s must be a finite number of seconds > 0"),
        ("bench.batch_size=0", "bench.batch_size must be >= 1 (got 0)"),
        ("bench.target_accuracy=1.5", "bench.target_accuracy must be in (0, 1] (got 1.5)"),
        ("bench.target_accuracy=nan", "bench.target_accuracy must be in (0, 1] (got nan)"),
        ("bench.target_accuracy=0", "bench.target_accuracy must be in (0, 1] (got 0.0)"),
        ("bench.eval_every=0", "bench.eval_every must be >= 1 (got 0)"),
        ("bench.max_epochs=0", "bench.max_epochs must be >= 1 (got 0)"),
        ("bench.lrs=[0.1,inf]", "bench.lrs must be finite numbers > 0 (got [0.1, inf])"),
    ],
)
def test_non_finite_and_out_of_range_numbers_fail_naming_the_key(override, message):
    """Values the schema's types accept but no run can use (inf, nan, negative rates)."""
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override",
    ["optim=sgd", "optim.momentum=0", "optim.weight_decay=0", "pipeline.timeout_s=0.5",
     "pipeline.auto_bandwidth_gbs=0.01", "bench.target_accuracy=1", "bench.lrs=[1e-4,0.1]"],
)  # fmt: skip
def test_edge_values_still_accepted(override):
    compose_config([override])


# ----------------------------------------------------------------------------- threads


@pytest.mark.parametrize(
    "threads,local_stages,cores,expected",
    [
        ("auto", 1, 16, 16),  # one process alone trains on every core
        ("auto", 4, 16, 4),  # stages share the machine's cores
        ("auto", 3, 16, 5),
        ("auto", 32, 16, 1),  # more stages than cores: one thread each, never 0
        (2, 4, 16, 2),  # =N pins it
        (1, 1, 16, 1),
    ],
)
def test_pipeline_threads_auto_shares_the_cores(
    threads, local_stages, cores, expected, monkeypatch
):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    cfg = compose_config([f"pipeline.threads={threads}"])
    assert stage_threads(cfg, local_stages) == expected


def test_pipeline_threads_defaults_to_auto_and_a_single_run_uses_every_core(monkeypatch):
    assert compose_config([]).pipeline.threads == "auto"
    cores = len(os.sched_getaffinity(0))
    set_threads(compose_config(["pipeline.stages=1"]), 0)  # what train_single does
    assert torch.get_num_threads() == cores


@pytest.mark.parametrize("value", ["0", "-1", "many", "true", "1.5"])
def test_pipeline_threads_bad_value_is_one_line(value):
    with pytest.raises(ConfigError) as err:
        compose_config([f"pipeline.threads={value}"])
    assert "pipeline.threads must be auto or an integer >= 1" in str(err.value)


class _Seen(Exception):
    pass


@pytest.mark.parametrize("threads,expected", [("auto", 1), (3, 3)])
def test_bench_runs_every_scheme_at_explicit_threads(threads, expected, monkeypatch, tmp_path):
    """sidpipe bench runs every scheme at the same threads per stage: auto, which would give
    the sequential references S times a stage's cores, is run as 1 (the recorded setting)."""
    seen = []

    def rows(cfg: Config) -> None:
        seen.append(cfg.pipeline.threads)
        raise _Seen

    monkeypatch.setattr(throughput, "simulated_rows", rows)
    cfg = compose_config(["bench.mode=simulate", f"pipeline.threads={threads}"])
    with pytest.raises(_Seen):
        throughput.run_bench(cfg, ["sidpipe", "bench"], tmp_path)
    assert seen == [expected]


@pytest.mark.parametrize(
    "run_dir,words",
    [
        ("/tmp/x/${nothere}", "hydra.run.dir cannot be resolved: Interpolation key 'nothere'"),
        ("{file}/run", "is not a directory"),
        ("{tmp}/" + "a" * 300 + "/b", "longer than"),
    ],
    ids=["broken-interpolation", "under-a-file", "name-too-long"],
)
def test_a_run_dir_hydra_cannot_create_is_one_line(tmp_path, run_dir, words):
    """hydra creates hydra.run.dir before sidpipe runs, and reports a failure there with a
    traceback: the command line is checked first (nothing is created by the check)."""
    from sidpipe.config import check_command_line

    (tmp_path / "file").write_text("")
    arg = "hydra.run.dir=" + run_dir.replace("{file}", str(tmp_path / "file")).replace(
        "{tmp}", str(tmp_path)
    )
    with pytest.raises(ConfigError) as e:
        check_command_line([arg])
    assert words in str(e.value) and "\n" not in str(e.value), e.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize(
    "override",
    ["bench.stages=[]", "bench.microbatches=[]", "bench.schemes=[]", "study.models=[]",
     "study.alphas=[]", "study.datasets=[]"],
)  # fmt: skip
def test_an_empty_grid_is_refused_not_an_empty_report(override):
    with pytest.raises(ConfigError) as e:
        compose_config([override])
    key = override.split("=")[0]
    assert f"{key}=[] is empty" in str(e.value) and "\n" not in str(e.value)


def test_output_dirs_naming_a_file_are_one_line(tmp_path):
    from sidpipe.bench.accuracy import main as accuracy_main

    file = tmp_path / "results.txt"
    file.write_text("")
    cfg = compose_config([f"bench.out_dir={file}", "bench.mode=simulate"])
    with pytest.raises(ConfigError, match="bench.out_dir=.* is a file; give a directory"):
        throughput.run_bench(cfg, ["sidpipe", "bench"], tmp_path)
    assert accuracy_main(["study.tiny=true", f"study.out={file}"]) == 1
