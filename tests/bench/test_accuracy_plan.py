"""Which runs a study plans, with which overrides, and how its command line is checked (all
in-process: no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidpipe.bench import accuracy
from sidpipe.bench.accuracy.plan import cost_key, plan, validate
from sidpipe.bench.accuracy.report import default_out
from sidpipe.config import StudyConfig, compose_config
from sidpipe.errors import ConfigError


def names(runs) -> list[str]:
    return [r.name for r in runs]


def test_run_counts_of_the_default_studies() -> None:
    plans = plan(StudyConfig(seeds=[0, 1]), [])
    assert list(plans) == ["reference", "blockwise", "noise", "alpha"]
    assert len(plans["reference"]) == 1 * 2 * 2  # mnist x seeds x {bp, sid}
    # [mnist, fashion_mnist] x 4 models x seeds x (one BP + blocks [2, 4, 8])
    assert len(plans["blockwise"]) == 2 * 4 * 2 * 4
    skipped = [r for r in plans["blockwise"] if r.skip_reason]
    assert len(skipped) == 2 * 2 and all("simplecnn has 4 natural layers" in r.skip_reason
                                         for r in skipped)  # fmt: skip
    assert len(plans["noise"]) == 3 * 2 * 2  # rates x seeds x methods
    assert len(plans["alpha"]) == 2 * (1 + 2 * 5)  # seeds x (BP + kl x alphas)
    assert plan(StudyConfig(name="depth"), []) == {}


def test_overrides_order_digest_and_groups() -> None:
    s = StudyConfig(name="blockwise", seeds=[0, 1], models=["mlp"], datasets=["digits"],
                    blocks=[4], epochs=3, threads=2)  # fmt: skip
    runs = plan(s, ["optim.lr=3e-4", "data.root=/somewhere"])["blockwise"]
    bp0, sid0, bp1, sid1 = runs
    assert sid0.overrides[:9] == [
        "pipeline.stages=1", "pipeline.threads=2", "progress=false", "logger=console",
        "train.epochs=3", "train.batch_size=256", "data.val_fraction=0.1", "seed=0",
        "model=mlp",
    ]  # fmt: skip
    assert sid0.overrides[-2:] == ["optim.lr=3e-4", "data.root=/somewhere"]  # the user's last
    assert {"model.depth=8", "model.blocks=4", "method=sid"} <= set(sid0.overrides)
    assert "method=bp" in bp0.overrides and not any("model.blocks" in o for o in bp0.overrides)
    assert sid0.group == sid1.group != bp0.group == bp1.group  # seeds aggregate
    assert sid1.name.endswith("-s1") and sid0.labels["blocks"] == 4 and sid0.epochs == 3
    # the digest covers what changes a result: not the seed, threads or where the data is
    elsewhere = plan(s, ["optim.lr=3e-4"])["blockwise"]
    assert names(elsewhere) == names(runs)
    assert names(plan(s, ["optim.lr=1e-3"])["blockwise"]) != names(runs)


def test_run_names_match_earlier_result_folders() -> None:
    """The same settings give the same folder as before the package move (resumable). BP's
    name changed once, on purpose: its runs now take one microbatch (was
    mnist-simplecnn-bp-e10-c3038e7c-s0, trained with 4)."""
    s = StudyConfig(name="blockwise", seeds=[0], models=["simplecnn"], datasets=["mnist"],
                    blocks=[2])  # fmt: skip
    assert names(plan(s, [])["blockwise"]) == [
        "mnist-simplecnn-bp-e10-efe4afe1-s0",
        "mnist-simplecnn-b2-sid-e10-dcf63c99-s0",
    ]


def test_every_bp_run_normalises_over_the_whole_batch() -> None:
    """BatchNorm in BP must see the samples it sees in SID: every study's BP runs take one
    microbatch, a user's pipeline.microbatches is refused, and validate() refuses a plan whose
    BP run would split the batch, in one line."""
    plans = plan(StudyConfig(seeds=[0], models=["vgg11"], datasets=["cifar10"]), [])
    bp = [r for runs in plans.values() for r in runs if r.labels["method"] == "bp"]
    assert {r.study for r in bp} == set(plans) == {"reference", "blockwise", "noise", "alpha"}
    for r in bp:
        assert compose_config(r.overrides).pipeline.microbatches == 1, r.name
    local = [r for runs in plans.values() for r in runs if r.labels["method"] != "bp"]
    assert not any("pipeline.microbatches" in o for r in local for o in r.overrides)
    with pytest.raises(ConfigError, match=r"pipeline.microbatches is set by the study .*BatchNorm"):
        plan(StudyConfig(name="blockwise"), ["pipeline.microbatches=4"])
    blockwise = plan(StudyConfig(name="blockwise", seeds=[0], models=["vgg11"],
                                 datasets=["cifar10"], blocks=[2]), [])  # fmt: skip
    split = blockwise["blockwise"][0]
    split.overrides = [o for o in split.overrides if o != "pipeline.microbatches=1"]
    with pytest.raises(ConfigError) as e:
        validate(blockwise)
    assert str(e.value) == (
        f"run blockwise/{split.name}: BP would normalise BatchNorm over train.batch_size/4 "
        "samples, SID over the whole batch of 256; a study's BP runs need "
        "pipeline.microbatches=1"
    )


def test_heads_are_a_plan_dimension_of_the_local_methods() -> None:
    s = StudyConfig(name="blockwise", seeds=[0, 1], models=["resnet18", "mlp"],
                    datasets=["cifar10"], blocks=[4], methods=["sid", "greedy"],
                    heads=["pool", "spatial"])  # fmt: skip
    runs = plan(s, [])["blockwise"]
    cnn = [r for r in runs if r.labels["model"] == "resnet18"]
    # per seed: BP once (default head), then per method each head
    assert [(r.labels["method"], r.labels.get("head")) for r in cnn[:5]] == [
        ("bp", None), ("sid", "pool"), ("sid", "spatial"), ("greedy", "pool"),
        ("greedy", "spatial"),
    ]  # fmt: skip
    pool, spatial = cnn[1], cnn[2]
    assert "model.head=spatial" in spatial.overrides and "-b4-spatial-sid-" in spatial.name
    assert not any(o.startswith("model.head") for o in pool.overrides)  # the name runs had
    assert "spatial" not in pool.name and pool.group != spatial.group
    assert compose_config(spatial.overrides).model.head == "spatial"
    # the mlp has no maps: its spatial cells are skipped, saying why
    skipped = [r for r in runs if r.skip_reason]
    assert {r.labels["model"] for r in skipped} == {"mlp"} and len(skipped) == 2 * 2
    assert all("model.head=spatial needs (C,H,W) maps" in r.skip_reason for r in skipped)
    # each head is its own kind of run: validated apart, estimated apart
    assert cost_key(pool) != cost_key(spatial)
    with pytest.raises(ConfigError, match=r"model.head is set by the study .*study.heads"):
        plan(s, ["model.head=conv"])
    with pytest.raises(ConfigError, match=r"study.heads=\['wide'\] must list some of pool"):
        compose_config(["study.heads=[wide]"])


def test_greedy_runs_beside_sid_on_every_block_count() -> None:
    """study.methods=[sid,greedy]: greedy is SID with alpha=1 on the same blocks, named and
    labelled apart; then a user's sid.alpha would relabel it, so it is refused."""
    s = StudyConfig(name="blockwise", seeds=[0], models=["resnet18"], datasets=["cifar10"],
                    blocks=[2, 4], methods=["sid", "greedy"])  # fmt: skip
    runs = plan(s, ["model.width=8"])["blockwise"]
    assert [r.labels["method"] for r in runs] == ["bp", "sid", "greedy", "sid", "greedy"]
    greedy = runs[2]
    assert {"method=sid", "sid.alpha=1.0", "model.blocks=2"} <= set(greedy.overrides)
    assert "-b2-greedy-" in greedy.name and greedy.group != runs[1].group
    assert not any(o.startswith("sid.alpha") for o in runs[1].overrides)
    assert compose_config(greedy.overrides).sid.alpha == 1.0
    assert compose_config(greedy.overrides).model.width == 8
    with pytest.raises(ConfigError, match=r"sid.alpha is set by the study .*study.methods"):
        plan(s, ["sid.alpha=0.3"])
    with pytest.raises(ConfigError, match=r"study.methods=\['dgl'\] must list some of sid, greedy"):
        compose_config(["study.methods=[dgl]"])


def test_arch_settings_of_noise_and_alpha() -> None:
    s = StudyConfig(name="alpha", seeds=[0], arch=["shared", "simplecnn-b4"], alphas=[0.5],
                    kl=["reverse"])  # fmt: skip
    runs = plan(s, [])["alpha"]
    assert len(runs) == 2 * 2
    shared, cnn = runs[1], runs[3]
    assert {"experiment=mnist_reference", "sid.variant=shared", "sid.alpha=0.5",
            "sid.kl_direction=reverse"} <= set(shared.overrides)  # fmt: skip
    assert {"model=simplecnn", "model.blocks=4", "sid.variant=blockwise"} <= set(cnn.overrides)
    tiny = plan(StudyConfig(name="all", tiny=True, seeds=[0], noise=[0.4]), [])
    assert tiny["alpha"][0].labels["arch"] == "mlp-b4" and tiny["noise"][0].labels["arch"] == (
        "shared"
    )


def test_tiny_values_yield_to_the_command_line() -> None:
    cfg, extra = accuracy.parse(["study.tiny=true", "study.blocks=[3]", "optim.lr=0.01"])
    s = cfg.study
    assert (s.seeds, s.epochs, s.datasets, s.models, s.blocks) == ([0], 1, ["digits"], ["mlp"], [3])
    assert extra == ["optim.lr=0.01"] and cfg.optim.lr == 0.01


def test_plan_lists_runs_and_skips(capsys) -> None:
    argv = ["study.name=blockwise", "study.models=[simplecnn]", "study.blocks=[2,8]",
            "study.seeds=[0,1]", "study.datasets=[mnist]", "study.plan=true"]  # fmt: skip
    code = accuracy.main(argv)
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# blockwise: 6 runs"
    skipped = [line for line in lines if "SKIP" in line]
    assert len(skipped) == 2 and all("4 natural layers" in line for line in skipped)
    assert sum("method=bp" in line for line in lines) == 2  # one BP run per seed


def test_default_output_is_under_the_working_directory() -> None:
    out = default_out("x86_64-2cpu")
    assert not out.is_absolute() and out.parts[:2] == ("benchmarks", "results")
    assert out.name.startswith("accuracy-x86_64-2cpu-")


# ---------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "values, key",
    [
        ({"name": "bogus"}, "study.name"),
        ({"seeds": []}, "study.seeds"),
        ({"epochs": 0}, "study.epochs"),
        ({"jobs": 0}, "study.jobs"),
        ({"threads": 0}, "study.threads"),
        ({"batch_size": 0}, "study.batch_size"),
        ({"estimate_steps": 0}, "study.estimate_steps"),
        ({"subset": 0}, "study.subset"),
        ({"val_fraction": 1.0}, "study.val_fraction"),
        ({"datasets": ["imagenet"]}, "study.datasets"),
        ({"models": ["custom"]}, "study.models"),
        ({"blocks": [0]}, "study.blocks"),
        ({"noise": [1.0]}, "study.noise"),
        ({"alphas": [1.5]}, "study.alphas"),
        ({"kl": ["sideways"]}, "study.kl"),
        ({"arch": ["vgg11-b0"]}, "study.arch"),
        ({"arch": ["transformer-b2"]}, "study.arch"),
    ],
)
def test_bad_study_value_names_the_key(values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        StudyConfig(**values)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override", ["study.seeds=x", "study.bogus=1", "study.jobs=0"])
def test_bad_study_override_names_the_key(override: str) -> None:
    """The same checks through hydra, as the command line reaches them."""
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        compose_config([override])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["study.name=blockwise", "optim.lrr=3e-4"], "unknown key 'optim.lrr' (did you mean"),
        (["model.width=0"], "model.width must be >= 1 (got 0)"),
        (["study.seeds=0"], "study.seeds=0"),
        (["study.name=blockwise", "seed=3"], "seed is set by the study for each run (study.seeds)"),
        (["study.name=alpha", "sid.alpha=0.3"], "sid.alpha is set by the study for each run"),
        (["data=[mnist,fashion_mnist]"], "study.datasets=[...]"),
        (["seeds=[0,1]"], "seeds= is a study setting: write study.seeds=[0,1]"),
        (["study=blockwise"], "study.name=<name>"),
        (["blockwise"], "is not key=value"),
        (["study.name=reference", "pipeline.cuda_graphs=true"], "run reference/"),
    ],
)
def test_user_errors_fail_up_front_in_one_line(argv, message, capsys) -> None:
    assert accuracy.main([*argv, "study.plan=true"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # not even the plan
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidpipe: error: ") and message in lines[0]


def test_free_train_overrides_are_accepted() -> None:
    cfg, extra = accuracy.parse(["study.name=blockwise", "study.models=[mlp]",
                                 "study.datasets=[digits]", "optim.lr=3e-4", "model.width=512",
                                 "logger=console", f"data.root={Path.cwd()}"])  # fmt: skip
    plans = plan(cfg.study, extra)
    validate(plans)
    assert all(r.overrides[-4:] == extra for r in plans["blockwise"])


def test_a_study_without_its_baseline_plans_the_same_local_runs_and_no_bp() -> None:
    """study.baseline=false: one cell at a time at its own lr, its runs named as in the whole
    study (so a later full invocation reuses them)."""
    s = StudyConfig(name="blockwise", seeds=[0, 1], models=["resnet18"], datasets=["cifar10"],
                    blocks=[4, 8], methods=["sid"], heads=["spatial"])  # fmt: skip
    whole = plan(s, ["optim.lr=3e-3"])["blockwise"]
    alone = plan(StudyConfig(**{**s.__dict__, "baseline": False, "blocks": [8]}),
                 ["optim.lr=3e-3"])["blockwise"]  # fmt: skip
    assert [r.labels["method"] for r in whole].count("bp") == 2
    assert names(alone) == [r.name for r in whole if r.labels.get("blocks") == 8]
    assert compose_config(["study.baseline=false"]).study.baseline is False
