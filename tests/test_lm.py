"""Language models: byte-level text data, model=gpt, SID per position, its pipeline.

The fast tier runs the pipeline in process (stages as threads over the loopback transport,
as tests/drivers/test_sid_runner.py does for images); one multi-process test checks the BP
pipeline on the same partition against single-process BP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sidpipe.config import compose_config
from sidpipe.data import TextBatches, load_data, train_batches
from sidpipe.drivers.sid import from_wire, to_wire
from sidpipe.drivers.single import train_single
from sidpipe.errors import ConfigError, DataError
from sidpipe.export import export_model
from sidpipe.inference import evaluate_model, generate_text
from sidpipe.inference import main as inference_main
from sidpipe.method.anytime import exit_depths, generate
from sidpipe.method.loss import sid_loss
from sidpipe.models import build_model
from sidpipe.runtime.io import load_state
from sidpipe.runtime.transport import Kind, Message
from sidpipe.saved import load_exported
from tests.conftest import REPO, read_summary, run_cli
from tests.drivers.test_sid_runner import run_stages

WORDS = "to be or not that is the question whether tis nobler in mind suffer".split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """~12 KB of deterministic text: enough for every split, small enough to evaluate fast."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(WORDS), (2400,), generator=g).tolist()
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(WORDS[i] for i in idx))
    return path


def lm(text_file: Path, *more: str) -> list[str]:
    # threads=1: a single-process reference sums in the same order as each 1-thread stage
    return ["model=gpt", "data=text", f"data.path={text_file}", "data.context=16",
            "model.width=32", "model.depth=4", "model.heads=2", "train.batch_size=8",
            "train.eval_batch_size=64", "train.epochs=2", "train.max_steps=12",
            "progress=false", "pipeline.threads=1", *more]  # fmt: skip


# ---------------------------------------------------------------------------- data


def test_text_splits_are_contiguous_and_windows_shift_by_one(text_file):
    cfg = compose_config(lm(text_file))
    data = load_data(cfg.data, cfg.seed)
    raw = torch.frombuffer(bytearray(text_file.read_bytes()), dtype=torch.uint8)
    parts = [data.train.data, data.val.data, data.test.data]
    assert torch.equal(torch.cat(parts), raw)  # in file order, nothing left out or repeated
    assert data.test.data.numel() == round(0.05 * raw.numel())
    x, y = next(train_batches(cfg, data).epoch(3))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    again, other = next(train_batches(cfg, data).epoch(3)), next(train_batches(cfg, data).epoch(4))
    assert torch.equal(again[0], x) and not torch.equal(other[0], x)
    # evaluation: the disjoint windows in order, every byte of the split a target once
    ev = TextBatches(data.test, 5, shuffle=False, seed=0)
    ys = torch.cat([b[1].flatten() for b in ev.epoch(0)])
    n = len(data.test) * 16
    assert torch.equal(ys, data.test.data[1 : n + 1].long())


@pytest.mark.parametrize(("content", "message"), [(None, "not found"), (b"", "is empty")])
def test_missing_or_empty_text_is_one_line(tmp_path, content, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    cfg = compose_config(["model=gpt", "data=text", f"data.path={path}"])
    with pytest.raises(DataError, match=message) as e:
        load_data(cfg.data, 0)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_context_longer_than_a_split_is_refused(text_file):
    cfg = compose_config(lm(text_file, "data.context=4096"))
    with pytest.raises(DataError, match=r"data.context=4096 is longer than the \w+ split"):
        load_data(cfg.data, 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=gpt"], "reads a text set"),
        (["data=shakespeare"], "only a language model reads"),
        (["model=gpt", "data=shakespeare", "model.width=30"], "multiple of model.heads"),
        (["model=gpt", "data=text"], "data.path"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


# ---------------------------------------------------------------------------- model, loss


def test_gpt_is_causal_and_predicts_every_position(text_file):
    cfg = compose_config(lm(text_file))
    torch.manual_seed(0)
    net = build_model(cfg.model, (16,), 256).eval()
    assert net.n_blocks == 4 and net.per_position
    x = torch.randint(0, 256, (2, 16))
    logits = net(x)
    assert [tuple(z.shape) for z in logits] == [(2, 16, 256)] * 4
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 256  # change one byte: no earlier position may notice
    for z, z2 in zip(logits, net(x2)):
        assert torch.equal(z[:, :10], z2[:, :10]) and not torch.equal(z[:, 10:], z2[:, 10:])
    # shorter prefixes (generation) run through the same network
    assert net(x[:, :5])[-1].shape == (2, 5, 256)


def test_sid_loss_is_the_mean_over_positions():
    g = torch.Generator().manual_seed(1)
    z, prev = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g).softmax(-1)
    y = torch.randint(0, 11, (3, 7), generator=g)
    per_row = torch.stack([sid_loss(z[:, t], y[:, t], prev[:, t]) for t in range(7)]).mean()
    torch.testing.assert_close(sid_loss(z, y, prev), per_row)


def test_wire_roundtrip_and_bf16_halves_belief_bytes():
    h, y = torch.randn(2, 5, 8), torch.randint(0, 256, (2, 5))
    p = torch.randn(2, 5, 256).softmax(-1)
    msg = Message(Kind.TRAIN, 0, 0, h, p, y)
    wire = to_wire(msg, bf16=False)
    assert wire.p.shape == (2, 5 * 256) and wire.y.shape == (10,)
    back = from_wire(wire, bf16=False, per_position=True)
    assert torch.equal(back.p, p) and torch.equal(back.y, y)
    half = to_wire(msg, bf16=True)
    assert half.p.dtype == torch.float32 and half.p.numel() * 2 == p.numel()
    back = from_wire(half, bf16=True, per_position=True)
    assert torch.equal(back.p, p.to(torch.bfloat16).float())


# ---------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def sequential(text_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lm-seq")
    summary = train_single(compose_config([*lm(text_file), "pipeline.stages=1"]), run_dir)
    return run_dir, summary


@pytest.mark.parametrize("layout", [["pipeline.stages=2"], ["pipeline.stages=3"]])
def test_sid_pipeline_equals_sequential_on_gpt(text_file, sequential, tmp_path, layout):
    seq_dir, seq = sequential
    cfg = compose_config([*lm(text_file), *layout])
    results = run_stages(cfg, tmp_path)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    a, b = load_state(seq_dir), load_state(tmp_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(cfg.seed)  # the runs' initial parameters: they moved, so this is no
    initial = build_model(cfg.model, (16,), 256).state_dict()  # vacuous comparison
    assert all(not torch.equal(initial[k], a[k]) for k in a if k.endswith("qkv.weight"))
    history = results[-1]["_history"]
    assert history == [{**r, "train_s": h["train_s"]} for r, h in zip(seq["evaluations"], history)]
    last = history[-1]
    assert len(last["test_bpb_per_depth"]) == 4 and len(last["val_bpb_per_depth"]) == 4
    assert all(r["bytes_sent_backward"] == 0 for r in results)
    assert seq["per_depth_bpb"] == last["test_bpb_per_depth"]
    assert seq["tokens_per_s"] > 0 and seq["test_bpb"] == last["test_bpb_per_depth"][-1]


def test_bf16_beliefs_cut_the_bytes_and_still_train(text_file, sequential, tmp_path):
    _, seq = sequential
    fp32 = run_stages(compose_config([*lm(text_file), "pipeline.stages=2"]), tmp_path / "a")
    bf16 = run_stages(
        compose_config([*lm(text_file), "pipeline.stages=2", "pipeline.belief_dtype=bf16"]),
        tmp_path / "b",
    )
    assert not [r for r in fp32 + bf16 if isinstance(r, Exception)]
    # per window: beliefs 16*256 floats, features 16*32 floats, targets 16 int64
    belief_bytes = fp32[0]["bytes_sent_forward"] - bf16[0]["bytes_sent_forward"]
    messages = fp32[0]["messages_sent"]
    assert belief_bytes > 0 and messages == bf16[0]["messages_sent"]
    bpb16 = bf16[-1]["_history"][-1]["test_bpb_per_depth"]
    assert all(abs(u - v) < 0.05 for u, v in zip(bpb16, seq["per_depth_bpb"]))


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_bp_pipeline_on_gpt_equals_single_process_bp(text_file, tmp_path, schedule):
    """BP on the same partition, 2 ranks, = single-process BP with the same microbatches:
    1F1B (one stage per rank) and ZBV (a V of 4 stages, backward split into input and weight
    gradients: the schedule with the most ways to differ from plain autograd)."""
    bp = [*lm(text_file), "method=bp", "pipeline.microbatches=4", "pipeline.threads=1",
          "pipeline.timeout_s=60"]  # fmt: skip
    s1 = train_single(compose_config([*bp, "pipeline.stages=1"]), tmp_path / "seq")
    pipe = run_cli([*bp, "pipeline.stages=2", f"pipeline.schedule={schedule}"],
                   tmp_path / "pipe", timeout=120)  # fmt: skip
    assert pipe.returncode == 0, pipe.stderr[-2000:]
    a, b = load_state(tmp_path / "seq"), load_state(tmp_path / "pipe")
    assert set(b) <= set(a)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    s2 = read_summary(tmp_path / "pipe")
    assert s2["per_depth_bpb"] == pytest.approx(s1["per_depth_bpb"], rel=1e-4)
    assert "bits/byte" in pipe.stdout + pipe.stderr
    if schedule == "1f1b":  # the pipeline saves only the head BP trains: still usable
        exported = export_model(tmp_path / "pipe", tmp_path / "bp.pt")
        r = evaluate_model(exported, [], plot=None)
        assert r["test_bpb"] == pytest.approx(s2["test_bpb"], rel=1e-4)
        single = export_model(tmp_path / "seq", tmp_path / "seq.pt")
        g = [generate_text(m, "to be", 12, None, None, 0.0, 7) for m in (exported, single)]
        assert g[0] == g[1] and g[0][1] == [4] * 12  # the same text, from the last module


# ---------------------------------------------------------------------------- anytime inference


@pytest.fixture(scope="module")
def exported(sequential, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm-export") / "lm.pt"
    export_model(sequential[0], out)
    return out


def test_eval_reports_bpb_and_the_early_exit_curve(exported, sequential, tmp_path):
    plot = tmp_path / "curve.png"
    r = evaluate_model(exported, [], thresholds=(0.05, 0.3, 1.0), plot=plot)
    assert r["per_depth_bpb"] == pytest.approx(sequential[1]["per_depth_bpb"])
    low, mid, high = r["early_exit"]
    assert low["mean_depth"] < high["mean_depth"]  # a lower bar stops earlier
    assert 1.0 <= low["mean_depth"] <= mid["mean_depth"] <= high["mean_depth"] <= 4.0
    if high["mean_depth"] == 4.0:  # nothing reached probability 1: the last module answers
        assert high["bits"] == pytest.approx(r["per_depth_bpb"][-1])
    assert plot.stat().st_size > 0


def test_generation_exits_where_the_teacher_forced_curve_does(exported):
    """A token sampled with early exit used exactly the depth that exit_depths picks for
    that position when the finished text is fed back whole: the curve `sidpipe eval` draws
    is the cost and quality generation gets."""
    cfg, net, _ = load_exported(exported, [], data=False)
    prompt = torch.tensor(list(b"to be"))
    g = torch.Generator().manual_seed(3)
    seq, used = generate(net, prompt, 10, threshold=0.3, generator=g)  # 15 <= context 16
    assert len(used) == 10 and len(set(used)) >= 1
    with torch.no_grad():
        depths = exit_depths(net(seq[None, :-1]), 0.3)[0]
    assert depths[len(prompt) - 1 :].tolist() == used
    again, _ = generate(net, prompt, 10, threshold=0.3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seq, again)
    shallow, used1 = generate(net, prompt, 5, depth=1, temperature=0)
    assert used1 == [1] * 5 and shallow[:5].tolist() == prompt.tolist()


def test_generate_errors_are_one_line(exported, tmp_path, capsys):
    for args, message in [
        ([str(exported), "--depth=9"], "--depth=9 must be in 1..4"),
        ([str(exported), "--threshold=0"], "must be a probability in (0, 1]"),
        ([str(exported), "--tokens=x"], "invalid int value: 'x'"),
        ([str(exported), "--depth=1", "--threshold=0.5"], "not allowed with argument --depth"),
        ([str(exported), "--tokens=1000000000"], "--tokens=1000000000 must be in 1..100,000"),
        ([str(exported), "--seed=-1"], "--seed=-1 must be in 0..2**63-1"),
        ([str(exported), "--seed=99999999999999999999999"], "must be in 0..2**63-1"),
        ([str(exported), "--temperature=inf"], "must be a finite number >= 0"),
        ([str(exported), "--temperature=-1e308"], "must be a finite number >= 0"),
        ([str(exported), "--bogus=1"], "unrecognized arguments: --bogus=1"),
    ]:
        with pytest.raises(SystemExit):
            inference_main("generate", args)
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    digits_run = tmp_path / "digits"
    tiny = ["data=digits", "model=mlp", "model.width=16", "progress=false", "train.max_steps=2",
            "pipeline.stages=1"]  # fmt: skip
    train_single(compose_config(tiny), digits_run)
    export_model(digits_run, tmp_path / "mlp.pt")
    with pytest.raises(ConfigError, match="classifier; generate samples from language models"):
        generate_text(tmp_path / "mlp.pt", "", 5, None, None, 1.0, 0)


def test_eval_on_data_of_the_other_kind_says_so(exported, tmp_path):
    with pytest.raises(ConfigError) as e:
        evaluate_model(exported, ["data=digits"])
    msg = str(e.value)
    assert "language model: it reads text" in msg and "not data=digits" in msg, msg
    assert "data.path" not in msg


def test_resumed_lm_run_equals_uninterrupted(text_file, sequential, tmp_path, caplog):
    """A run stopped at a checkpoint and resumed draws the same windows and ends with the
    same parameters (the text batches depend on (seed, epoch, batch) alone)."""
    seq_dir, _ = sequential
    half = [*lm(text_file), "pipeline.stages=1", "checkpoint.every_n_steps=5"]
    train_single(compose_config([*half, "train.max_steps=5"]), tmp_path)
    with caplog.at_level("INFO", logger="sidpipe"):
        train_single(compose_config([*half, "resume=auto"]), tmp_path)  # on to max_steps=12
    assert "at step 5" in caplog.text  # it resumed, rather than trained anew
    a, b = load_state(seq_dir), load_state(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiprocess
def test_ctrl_c_in_generate_is_one_line(exported):
    """A long generation stopped with Ctrl-C: one line, exit 130, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidpipe.cli", "generate", str(exported), "--tokens=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # as at a terminal: a background job (CI's) inherits SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        time.sleep(15)  # imports, the model read, then sampling (100,000 tokens take minutes)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err == "sidpipe: error: interrupted by SIGINT\n", err
