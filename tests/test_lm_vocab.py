"""Language models at real vocabulary sizes: the BPE tokenizer, bits per byte
whatever the tokenizer, and top-k beliefs on the wire (pipeline.belief_topk).

Fast tier: every pipeline here runs in process (stages as threads over the loopback
transport), on a ~20 KB text with a BPE of a few hundred tokens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from sidpipe.config import compose_config
from sidpipe.data import eval_splits, load_data
from sidpipe.drivers.single import train_single
from sidpipe.errors import CheckpointError, ConfigError, DataError
from sidpipe.export import export_model
from sidpipe.inference import evaluate_model, generate_text
from sidpipe.inference import main as inference_main
from sidpipe.method.step import evaluate_split, make_method
from sidpipe.models import build_net
from sidpipe.models.heads import dense_belief, index_dtype, sparse_prior, topk_belief
from sidpipe.runtime.io import load_state
from sidpipe.runtime.transport import Kind, LoopbackTransport, Message
from sidpipe.runtime.wire import (
    from_wire,
    pack_topk,
    to_wire,
    topk_words,
    unpack_topk,
    wire_nbytes,
)
from sidpipe.tokenizer import (
    cache_dir,
    encode_cached,
    keep_in_run,
    load_bpe,
    sha256_bytes,
    train_bpe,
)
from tests.conftest import read_summary, run_cli
from tests.drivers.test_sid_runner import TINY, run_stages, run_threads
from tests.test_lm import lm as lm_small

V = 320  # the tests' BPE vocabulary: 256 bytes + 64 merges


@pytest.fixture(scope="module", autouse=True)
def tokenizer_cache(tmp_path_factory):
    """Trained tokenizers go to a temporary cache, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("SIDPIPE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """~20 KB of deterministic text over 150 made-up words (plenty of merges for a BPE of
    320 tokens), with a few non-ASCII characters so byte and character counts differ."""
    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyzé"
    words = ["".join(letters[int(i)] for i in torch.randint(0, 27, (int(n),), generator=g))
             for n in torch.randint(2, 8, (150,), generator=g)]  # fmt: skip
    idx = torch.randint(0, len(words), (3200,), generator=g).tolist()
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(words[i] for i in idx) + "\n", encoding="utf-8")
    return path


def lm(text_file: Path, *more: str) -> list[str]:
    """test_lm's small GPT, 10 steps."""
    return lm_small(text_file, "train.max_steps=10", *more)


def bpe(text_file: Path, *more: str) -> list[str]:
    return lm(text_file, "data.tokenizer=bpe", f"data.vocab_size={V}", *more)


# ---------------------------------------------------------------------------- the tokenizer


def test_bpe_training_is_deterministic_and_cached(text_file, tokenizer_cache):
    corpus = text_file.read_bytes()[:8000]
    assert train_bpe(corpus, V) == train_bpe(corpus, V)  # trained twice: the same file
    cfg = compose_config(bpe(text_file))
    data = load_data(cfg.data, 0)
    tok = data.tokenizer
    assert tok is not None and tok.kind == "bpe" and data.num_classes == V
    assert tok.path is not None and tok.path.parent == cache_dir()
    # the name holds the size and the training split's hash; the metadata says what it is
    train_bytes = tok.decode(data.train.data.tolist())
    assert f"v{V}-c{sha256_bytes(train_bytes)[:16]}" in tok.path.name
    meta = json.loads(tok.path.with_suffix(".meta.json").read_text())
    assert meta["sha256"] == tok.sha256 == sha256_bytes(tok.path.read_bytes())
    assert meta["corpus_sha256"] == sha256_bytes(train_bytes)
    stamp = tok.path.stat().st_mtime_ns
    again = load_data(cfg.data, 0).tokenizer
    assert again.sha256 == tok.sha256 and tok.path.stat().st_mtime_ns == stamp  # reused
    # a damaged cache is trained again, to the same file
    tok.path.write_text("{ not json")
    third = load_data(cfg.data, 0).tokenizer
    assert third.sha256 == tok.sha256 and sha256_bytes(tok.path.read_bytes()) == tok.sha256


def test_encoded_text_cache_is_checked(text_file):
    """Encoded splits are cached too (every stage process loads the data); a cached array
    that does not decode to the text's length is encoded again, not used."""
    import numpy as np

    tok = load_data(compose_config(bpe(text_file)).data, 0).tokenizer
    text = text_file.read_bytes()
    fresh = tok.encode(text)
    assert torch.equal(encode_cached(tok, text), fresh)
    (cached,) = [p for p in (cache_dir() / "tokens").iterdir()
                 if torch.equal(torch.from_numpy(np.load(p)), fresh)]  # fmt: skip
    np.save(cached, fresh[:-1].numpy())  # one token short: the wrong length of text
    assert torch.equal(encode_cached(tok, text), fresh)
    assert torch.equal(torch.from_numpy(np.load(cached)), fresh)  # and cached right again


def test_bpe_splits_cover_the_text_and_are_trained_on_training_only(text_file):
    cfg = compose_config(bpe(text_file))
    data = load_data(cfg.data, 0)
    tok = data.tokenizer
    parts = [data.train, data.val, data.test]
    raw = text_file.read_bytes()
    assert b"".join(tok.decode(s.data.tolist()) for s in parts) == raw  # nothing lost
    assert all(s.data.dtype == torch.int32 and int(s.data.max()) < V for s in parts)
    assert sum(s.data.numel() for s in parts) < 0.7 * len(raw)  # merges happened
    # the vocabulary comes from the training split alone: train on it, get the same file
    assert train_bpe(tok.decode(data.train.data.tolist()), V) == tok.text
    # every token's byte count: the decoded length of a split is the sum over its tokens
    for s in parts:
        assert int(tok.token_bytes[s.data.long()].sum()) == len(tok.decode(s.data.tolist()))


def test_bits_per_byte_count_the_bytes_not_the_tokens(text_file):
    """A BPE model's bits per byte are its nats over the split's bytes (those its scored
    targets stand for), computed here from the logits and the decoded text by hand."""
    cfg = compose_config(bpe(text_file, "pipeline.stages=1"))
    data = load_data(cfg.data, 0)
    net = build_net(cfg, data)
    method = make_method(cfg, net, 1, torch.device("cpu"))
    test = eval_splits(cfg, data)["test"]
    bits = evaluate_split(method, test, torch.device("cpu"))["bits"]
    nll, targets = 0.0, []
    with torch.no_grad():
        for x, y in test.epoch(0):
            nll += float(torch.nn.functional.cross_entropy(
                net(x)[-1].flatten(0, 1), y.flatten(), reduction="sum"))  # fmt: skip
            targets += y.flatten().tolist()
    n_bytes = len(data.tokenizer.decode(targets))
    assert n_bytes > 1.3 * len(targets)  # tokens and bytes differ: the test can tell
    assert bits[-1] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-9)
    assert test.scored_bytes == n_bytes


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.tokenizer=words"], "data.tokenizer='words' must be one of bytes, bpe"),
        (["data.tokenizer=bpe"], "needs data.vocab_size=N"),
        (["data.tokenizer=bpe", "data.vocab_size=100"], "data.vocab_size must be in 257.."),
        (["data.vocab_size=2048"], "data.vocab_size=2048 needs data.tokenizer=bpe"),
        (
            ["data.tokenizer=bpe", "data.vocab_size=300", "data.tokenizer_sha256=xyz"],
            "64 lowercase hex digits",
        ),
        (["pipeline.belief_topk=0"], "pipeline.belief_topk must be >= 1"),
        (["pipeline.belief_topk=256"], "pipeline.belief_topk=256 must be below the vocabulary"),
        (
            ["data.tokenizer=bpe", "data.vocab_size=300", "pipeline.belief_topk=300"],
            "below the vocabulary size 300",
        ),
        (["pipeline.belief_topk=8", "method=bp"], "applies to method=sid"),
        (["pipeline.belief_topk=8", "pipeline.belief_dtype=bf16"], "does not combine"),
    ],
)
def test_config_errors_are_one_line(text_file, overrides, message):
    with pytest.raises(ConfigError) as e:
        compose_config(lm(text_file, *overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_tokenizer_on_images_and_topk_beyond_classes_are_refused():
    with pytest.raises(ConfigError, match="data.tokenizer applies to text sets"):
        compose_config(["data=digits", "data.tokenizer=bpe", "data.vocab_size=300"])
    cfg = compose_config(["data=digits", "model=mlp", "pipeline.belief_topk=10"])
    with pytest.raises(ConfigError, match=r"pipeline.belief_topk=10 must be in 1..9"):
        build_net(cfg, load_data(cfg.data, 0))


def test_bad_tokenizer_files_are_one_line(text_file, tmp_path):
    cfg = compose_config(bpe(text_file))
    good = load_data(cfg.data, 0).tokenizer
    path = tmp_path / "tok.json"
    path.write_text(good.text)
    assert load_bpe(path, good.sha256, V).sha256 == good.sha256
    broken = json.loads(good.text)
    broken["model"]["vocab"] = 3  # the right sections, but no vocabulary tokenizers can read
    cases = [
        ("{ not json", None, V, "bad JSON"),
        (json.dumps({"model": {"type": "WordPiece"}}), None, V, "not a BPE tokenizer"),
        (json.dumps(broken), None, V, "not a usable tokenizer"),
        (good.text, "0" * 64, V, "does not match its record"),
        (
            good.text.replace('"normalizer":null', '"normalizer":{"type":"Lowercase"}'),
            None,
            V,
            "not a plain byte-level BPE (normalizer Lowercase",
        ),
        (good.text, None, 300, "data.vocab_size=300"),
    ]
    for text, sha, vocab, message in cases:
        path.write_text(text)
        with pytest.raises(DataError) as e:
            load_bpe(path, sha, vocab)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(DataError, match="not found"):
        load_bpe(tmp_path / "missing.json", None, V)
    # through the config: a tokenizer file that is not what it is said to be
    path.write_text(good.text)
    with pytest.raises(DataError, match="does not match its record"):
        load_data(compose_config(bpe(text_file, f"data.tokenizer_path={path}",
                                     f"data.tokenizer_sha256={'1' * 64}")).data, 0)  # fmt: skip


def test_non_utf8_text_and_a_foreign_run_tokenizer_are_one_line(text_file, tmp_path):
    binary = tmp_path / "bin.dat"
    binary.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(DataError, match="is not UTF-8 text"):
        load_data(compose_config(bpe(binary)).data, 0)
    load_data(compose_config(lm(binary)).data, 0)  # bytes read any file
    tok = load_data(compose_config(bpe(text_file)).data, 0).tokenizer
    keep_in_run(tok, tmp_path)
    keep_in_run(tok, tmp_path)  # a resume: the same file, accepted
    (tmp_path / "tokenizer.json").write_text(tok.text.replace('"BPE"', '"BPE" '))
    with pytest.raises(DataError, match="is not this run's tokenizer"):
        keep_in_run(tok, tmp_path)


# ---------------------------------------------------------------------------- run, export, eval


@pytest.fixture(scope="module")
def bpe_run(text_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bpe-run")
    summary = train_single(compose_config([*bpe(text_file), "pipeline.stages=1"]), run_dir)
    return run_dir, summary


def test_export_carries_the_tokenizer_to_eval_and_generate(bpe_run, text_file, tmp_path, capsys):
    run_dir, summary = bpe_run
    # throughput that compares across tokenizers: text bytes/s = tokens/s x bytes per token
    data = load_data(compose_config(bpe(text_file)).data, 0)
    per_token = len(data.tokenizer.decode(data.train.data.tolist())) / data.train.data.numel()
    assert summary["text_bytes_per_token"] == pytest.approx(per_token) and per_token > 1.3
    assert summary["text_bytes_per_s"] == pytest.approx(summary["tokens_per_s"] * per_token)
    assert summary["tokenizer"] == "bpe" and summary["vocab_size"] == V
    assert not [k for k in summary if k.startswith("_")]
    kept = run_dir / "tokenizer.json"
    assert kept.is_file()
    out = export_model(run_dir, tmp_path / "m.pt")
    side = json.loads((tmp_path / "m.pt.json").read_text())
    carried = tmp_path / side["tokenizer"]["file"]
    assert carried.name == "m.pt.tokenizer.json" and carried.read_bytes() == kept.read_bytes()
    assert side["tokenizer"]["sha256"] == sha256_bytes(kept.read_bytes())
    # eval rebuilds the data with the carried tokenizer: the run's own bits per byte
    r = evaluate_model(out, [], thresholds=(0.5,), plot=None)
    assert r["per_depth_bpb"] == pytest.approx(summary["per_depth_bpb"], rel=1e-12)
    # a data group chosen again (its yaml reloaded on the saved section) keeps the tokenizer
    again = evaluate_model(out, ["data=text", f"data.path={text_file}", "data.context=16"],
                           thresholds=(0.5,), plot=None)  # fmt: skip
    assert again["per_depth_bpb"] == r["per_depth_bpb"]
    text, used = generate_text(out, "ab", 12, None, None, 1.0, 0)
    assert text.startswith("ab") and len(used) == 12
    # the carried tokenizer, changed after export: refused in one line, nothing runs
    carried.write_text(carried.read_text().replace('"BPE"', '"BPE" '))
    for command, args in (("eval", [str(out)]), ("generate", [str(out), "--tokens=3"])):
        with pytest.raises(SystemExit):
            inference_main(command, args)
        err = capsys.readouterr().err
        assert "does not match its record" in err and err.count("\n") == 1, err
    # a sidecar that names a path instead of a file beside the model
    side["tokenizer"]["file"] = "../elsewhere.json"
    (tmp_path / "m.pt.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="records no usable tokenizer"):
        evaluate_model(out, [], thresholds=(0.5,), plot=None)


def test_export_without_the_run_tokenizer_is_one_line(bpe_run, tmp_path):
    run_dir, _ = bpe_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("summary.json", "model"):
        os.symlink(run_dir / name, copy / name)
    with pytest.raises(CheckpointError, match="its tokenizer is not at"):
        export_model(copy, tmp_path / "m.pt")


# ---------------------------------------------------------------------------- top-k beliefs


@pytest.mark.parametrize(
    ("vocab", "dtype"),
    [
        (10, torch.uint8),
        (256, torch.uint8),
        (2048, torch.uint16),
        (8192, torch.uint16),
        (65536, torch.uint16),
        (70000, torch.int32),
    ],
)
def test_topk_message_layout(vocab, dtype):
    """What is sent: k fp32 values, the fp32 rest, k indices in the smallest integer dtype
    that holds V, packed into whole fp32 words; unpacked exactly."""
    assert index_dtype(vocab) == dtype
    k = 5
    p = torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(vocab)).softmax(-1)
    values, idx, rest = topk_belief(p, k)
    assert values.dtype == rest.dtype == torch.float32 and idx.dtype == dtype
    assert values.shape == idx.shape == (2, 3, k) and rest.shape == (2, 3, 1)
    words = pack_topk(p, k)
    size = torch.empty((), dtype=dtype).element_size()
    assert words.dtype == torch.float32
    assert words.shape == (2, 3, topk_words(k, vocab)) == (2, 3, -(-(4 * k + 4 + size * k) // 4))
    v2, i2, r2 = unpack_topk(words, k, vocab)
    assert torch.equal(v2, values) and torch.equal(i2, idx) and torch.equal(r2, rest)
    assert torch.equal(i2.long(), p.topk(k, -1).indices)


def test_topk_rebuilt_prior():
    """What is rebuilt: the top-k entries exactly, the rest spread evenly, summing to 1."""
    g = torch.Generator().manual_seed(0)
    p = (3 * torch.randn(4, 7, 256, generator=g)).softmax(-1)
    k = 8
    q = sparse_prior(p, k)
    top = p.topk(k, -1)
    assert torch.equal(q.gather(-1, top.indices), top.values)  # exact
    others = torch.ones_like(q, dtype=torch.bool).scatter_(-1, top.indices, False)
    rest = q[others].view(4, 7, 256 - k)
    assert torch.equal(rest, rest[..., :1].expand_as(rest))  # even
    expected = (1 - top.values.sum(-1)) / (256 - k)
    torch.testing.assert_close(rest[..., 0], expected)
    torch.testing.assert_close(q.sum(-1), torch.ones(4, 7))
    assert sparse_prior(p, None) is p
    # a belief all on its top-k: the rest is 0, not negative
    one = torch.zeros(1, 256).index_fill_(1, torch.tensor([3]), 1.0)
    assert float(dense_belief(*topk_belief(one, 2), 256).min()) == 0.0


def test_topk_wire_roundtrip_and_bytes_counted():
    """A language-model message through to_wire / the loopback transport / from_wire: the
    receiver's prior is the rebuilt one, and the transport counts W words per position in
    place of V floats."""
    b, t, d, vocab, k = 2, 5, 8, 256, 16
    g = torch.Generator().manual_seed(1)
    h, y = torch.randn(b, t, d, generator=g), torch.randint(0, vocab, (b, t), generator=g)
    p = torch.randn(b, t, vocab, generator=g).softmax(-1)
    msg = Message(Kind.TRAIN, 0, 0, h, p, y)
    sent = {}
    for name, topk in (("dense", None), ("topk", k)):
        links = LoopbackTransport.links(2)
        tx, rx = LoopbackTransport(0, links, 5.0), LoopbackTransport(1, links, 5.0)
        tx.send(to_wire(msg, False, topk))
        back = from_wire(rx.recv(), False, True, topk, vocab)
        assert back.p.shape == p.shape and torch.equal(back.y, y) and torch.equal(back.h, h)
        assert torch.equal(back.p, sparse_prior(p, topk))
        sent[name] = tx.stats.bytes_forward
    words = topk_words(k, vocab)
    assert words == 21  # 16 values + rest + 16 one-byte indices = 84 bytes
    assert sent["dense"] - sent["topk"] == b * t * (vocab - words) * 4


@pytest.fixture(scope="module")
def topk_sequential(text_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("topk-seq")
    cfg = compose_config([*bpe(text_file), "pipeline.stages=1", "pipeline.belief_topk=8"])
    return run_dir, train_single(cfg, run_dir)


@pytest.mark.parametrize("stages", [2, 3])
def test_topk_pipeline_equals_sequential_bitwise(text_file, topk_sequential, bpe_run, tmp_path,
                                                 stages):  # fmt: skip
    """With top-k beliefs (and a BPE), the pipeline still equals the single-process run
    bit for bit: both compress every module-to-module belief the same way (3 stages of 4
    modules: compressed on the wire and inside a stage). The compression matters: the
    dense run ends elsewhere; and it sends fewer bytes."""
    seq_dir, seq = topk_sequential
    cfg = compose_config([*bpe(text_file), f"pipeline.stages={stages}",
                          "pipeline.belief_topk=8"])  # fmt: skip
    results = run_stages(cfg, tmp_path / "topk")
    assert not [r for r in results if isinstance(r, Exception)], results
    a, b = load_state(seq_dir), load_state(tmp_path / "topk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dense = load_state(bpe_run[0])
    assert any(not torch.equal(a[k], dense[k]) for k in a)
    history = results[-1]["_history"]
    assert history == [{**r, "train_s": h["train_s"]} for r, h in zip(seq["evaluations"], history)]
    assert all(r["bytes_sent_backward"] == 0 for r in results)
    if stages == 2:
        full = run_stages(compose_config([*bpe(text_file), "pipeline.stages=2"]), tmp_path / "d")
        rows = 8 * 16  # positions per training message
        per_msg = (V - topk_words(8, V)) * 4 * rows
        saved = full[0]["bytes_sent_forward"] - results[0]["bytes_sent_forward"]
        assert saved >= per_msg * 10  # ten TRAIN messages, plus the evaluation messages


@pytest.mark.multiprocess
def test_topk_bpe_pipeline_across_processes(text_file, topk_sequential, tokenizer_cache,
                                            tmp_path):  # fmt: skip
    """Two stage processes over gloo (the real Transport: buffers sized from the header's
    packed width), a BPE every rank loads from the cache the launcher's check filled: the
    same parameters as the single-process run, and the tokenizer kept in the run."""
    seq_dir, seq = topk_sequential
    args = [*bpe(text_file), "pipeline.stages=2", "pipeline.belief_topk=8", "pipeline.threads=1",
            "pipeline.timeout_s=60"]  # fmt: skip
    r = run_cli(args, tmp_path, timeout=180, env={"SIDPIPE_CACHE": str(tokenizer_cache)})
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_state(seq_dir), load_state(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    pipe = read_summary(tmp_path)
    assert pipe["per_depth_bpb"] == pytest.approx(seq["per_depth_bpb"], rel=1e-5)
    assert pipe["text_bytes_per_token"] == seq["text_bytes_per_token"] > 1.3
    assert (tmp_path / "tokenizer.json").read_bytes() == (seq_dir / "tokenizer.json").read_bytes()


def test_resumed_bpe_run_reuses_its_tokenizer(text_file, bpe_run, tmp_path, caplog):
    """A BPE run stopped at a checkpoint and resumed with the tokenizer cache emptied trains
    the same tokenizer again (deterministic), which its run directory's copy confirms, and
    ends with the uninterrupted run's parameters."""
    half = [*bpe(text_file), "pipeline.stages=1", "checkpoint.every_n_steps=5"]
    train_single(compose_config([*half, "train.max_steps=5"]), tmp_path)
    kept = (tmp_path / "tokenizer.json").read_bytes()
    shutil.rmtree(cache_dir())
    with caplog.at_level("INFO", logger="sidpipe"):
        train_single(compose_config([*half, "resume=auto"]), tmp_path)  # on to max_steps=10
    assert "at step 5" in caplog.text  # it resumed, rather than trained anew
    assert (tmp_path / "tokenizer.json").read_bytes() == kept
    assert any(cache_dir().iterdir())  # trained and cached again
    a, b = load_state(bpe_run[0]), load_state(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_topk_classifier_pipeline_equals_sequential(tmp_path):
    """Top-k beliefs are not language-model only: a 10-class MLP sends its 3 largest class
    probabilities (uint8 indices) and still equals its single-process run bit for bit."""
    topk = ["pipeline.belief_topk=3"]
    seq = train_single(compose_config([*TINY, *topk, "pipeline.stages=1"]), tmp_path / "s")
    results = run_threads([*topk, "pipeline.stages=3"], tmp_path / "p")
    assert not [r for r in results if isinstance(r, Exception)], results
    a, b = load_state(tmp_path / "s"), load_state(tmp_path / "p")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert results[-1]["_history"][-1]["test_per_depth"] == seq["per_depth_accuracy"]


def test_topk_consistency_reaches_every_module_but_the_first(tmp_path):
    """sid.topk_consistency changes the loss of every module that reads a top-k prior and
    of no other: the network's first module (which reads the uniform p_0) trains the same
    parameters under both rules, every later one different ones."""
    states = {}
    for rule in ("partition", "even"):
        cfg = compose_config([*TINY, "pipeline.belief_topk=3", "pipeline.stages=1",
                              "train.max_steps=5", f"sid.topk_consistency={rule}"])  # fmt: skip
        train_single(cfg, tmp_path / rule)
        states[rule] = load_state(tmp_path / rule)
    a, b = states["partition"], states["even"]
    equal: dict[str, bool] = {}  # module index -> all its block and head tensors equal
    for key in a:
        m = key.split(".")[1]
        equal[m] = equal.get(m, True) and torch.equal(a[key], b[key])
    assert equal == {"0": True, "1": False, "2": False, "3": False}


def test_simulator_and_balancer_charge_the_bytes_sent(text_file):
    """wire_nbytes (what the simulator and partition=auto charge a link with) is what the
    wire carries: dense V floats, or W words per position with top-k."""
    h, y = torch.randn(2, 16, 32), torch.randint(0, 256, (2, 16))
    p = torch.randn(2, 16, 256).softmax(-1)
    dense = wire_nbytes(compose_config(lm(text_file)), h, p, y)
    topk = wire_nbytes(compose_config(lm(text_file, "pipeline.belief_topk=8")), h, p, y)
    assert dense == h.numel() * 4 + p.numel() * 4 + y.numel() * 8
    assert dense - topk == 2 * 16 * (256 - topk_words(8, 256)) * 4
