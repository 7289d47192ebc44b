"""RunLogger: metrics.jsonl always; a real wandb run (offline) when logger=wandb.

The wandb checks read back what wandb 0.31 actually writes: in offline mode it keeps every
record (run + config, history rows, summary updates, exit) in the run's `run-<id>.wandb` file
(LevelDB-log framing of protobuf `Record`s) and writes no files/wandb-summary.json, so the
test parses that file.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidpipe.config import Config, LoggerConfig, WandbConfig, to_dict
from sidpipe.runtime.logger import (
    LoggerError,
    RunLogger,
    flatten,
    make_logger,
    scalars,
    trim_metrics,
)

TRAIN = {"kind": "train", "step": 20, "epoch": 0, "loss": [0.9, 0.7, 0.5]}
EVAL = {"kind": "eval", "step": 20, "epoch": 0, "test_per_depth": [0.5, 0.6, 0.7, 0.8]}
SUMMARY = {
    "method": "sid",
    "stages": 2,
    "test_accuracy": 0.8,
    "per_depth_accuracy": [0.5, 0.6, 0.7, 0.8],
    "per_stage": [{"stage": 0, "busy_fraction": 0.9}, {"stage": 1, "busy_fraction": 0.8}],
    "best": None,
}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, silent, and every wandb side directory inside tmp_path."""
    side = tmp_path / "wandb-side"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    for var in (
        "WANDB_DIR",
        "WANDB_CACHE_DIR",
        "WANDB_CONFIG_DIR",
        "WANDB_DATA_DIR",
        "WANDB_ARTIFACT_DIR",
    ):
        monkeypatch.setenv(var, str(side / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return side


def wandb_cfg(mode: str = "offline") -> LoggerConfig:
    return LoggerConfig(name="wandb", wandb=WandbConfig(project="sidpipe-test", mode=mode))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_wandb_records(path: Path) -> list:
    """Protobuf records of a .wandb file: header ':W&B' + magic + version, then 32 KiB blocks
    of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:8]
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def _items(updates) -> dict:
    return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}


def test_flatten_and_scalars():
    rec = {"kind": "eval", "step": 3, "a": {"b": [1, 2.5]}, "s": "x", "n": None, "ok": True}
    assert dict(flatten(rec)) == {
        "kind": "eval",
        "step": 3,
        "a/b/0": 1,
        "a/b/1": 2.5,
        "s": "x",
        "n": None,
        "ok": True,
    }
    assert scalars(rec) == {"step": 3, "a/b/0": 1, "a/b/1": 2.5, "ok": True}
    torch = pytest.importorskip("torch")
    assert scalars({"t": torch.tensor(1.5), "big": torch.zeros(3)}) == {"t": 1.5}
    assert scalars({"loss": [torch.tensor(2.0)]}) == {"loss/0": 2.0}


def test_console_logger_writes_flushed_jsonl(tmp_path):
    run_dir = tmp_path / "run"
    rl = make_logger(run_dir, to_dict(Config()), LoggerConfig())
    assert type(rl) is RunLogger
    rl.log(TRAIN)
    # flushed per line: readable before close
    assert read_jsonl(run_dir / "metrics.jsonl") == [TRAIN]
    rl.log(EVAL)
    rl.summary(SUMMARY)
    rl.close()
    rl.close()  # idempotent
    assert read_jsonl(run_dir / "metrics.jsonl") == [TRAIN, EVAL]
    assert not (run_dir / "wandb").exists()
    with pytest.raises(RuntimeError):
        rl.log(TRAIN)


def test_trim_metrics_keeps_what_the_checkpoint_covers(tmp_path):
    """A died attempt logged steps 1..30 and was cut mid-line; resuming from step 20 keeps
    1..20 (and lines without a step), drops the rest, and is a no-op the second time."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "config"})]
    lines += [json.dumps({"kind": "train", "stage": 1, "step": s}) for s in range(1, 31)]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "st')
    assert trim_metrics(path, 20) == 11
    kept = [json.loads(x) for x in path.read_text().splitlines()]
    assert kept[0] == {"kind": "config"} and [r["step"] for r in kept[1:]] == list(range(1, 21))
    assert trim_metrics(path, 20) == 0 and trim_metrics(tmp_path / "absent.jsonl", 5) == 0


def test_console_is_the_default_and_appends(tmp_path):
    with make_logger(tmp_path, {}, None) as rl:
        rl.log(TRAIN)
    with make_logger(tmp_path, {}, None) as rl:
        rl.log(EVAL)
    assert [r["kind"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == ["train", "eval"]


def test_wandb_disabled_is_console_only(tmp_path, wandb_env):
    with make_logger(tmp_path, {}, wandb_cfg("disabled")) as rl:
        assert type(rl) is RunLogger
        rl.log(TRAIN)
    assert not (tmp_path / "wandb").exists()


@pytest.mark.multiprocess  # wandb starts its service process
def test_wandb_offline_run_records_metrics_config_and_summary(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    cfg = Config()
    cfg.logger = wandb_cfg()
    with make_logger(run_dir, to_dict(cfg), cfg.logger) as rl:
        assert rl.name == "wandb"
        rl.log(TRAIN)
        rl.log(EVAL)  # same step as the train row
        rl.log({"kind": "train", "step": 40, "epoch": 1, "loss": [0.8, 0.6, 0.4]})
        rl.log({"kind": "eval", "step": 10, "val_per_depth": [0.4]})  # an earlier step: kept
        rl.summary(SUMMARY)

    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 4
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    assert not list(wandb_env.rglob("*.wandb"))  # dir=run_dir wins over $WANDB_DIR

    records = read_wandb_records(files[0])
    by_type: dict[str, list] = {}
    for rec in records:
        by_type.setdefault(rec.WhichOneof("record_type"), []).append(rec)

    assert {"run", "history", "summary", "exit"} <= set(by_type), [
        r.WhichOneof("record_type") for r in records
    ]
    run = by_type["run"][0].run
    assert run.project == "sidpipe-test"
    config = _items(run.config.update)
    assert config["logger"]["name"] == "wandb"
    assert config["model"]["name"] == cfg.model.name
    assert config["pipeline"]["stages"] == 1

    rows = [_items(r.history.item) for r in by_type["history"]]
    steps = [row.get("step") for row in rows]
    assert steps == [20, 20, 40, 10]
    assert rows[0]["loss/0"] == 0.9 and rows[0]["loss/2"] == 0.5 and rows[0]["epoch"] == 0
    assert rows[1]["test_per_depth/3"] == 0.8
    assert rows[2]["loss/1"] == 0.6
    assert rows[3]["val_per_depth/0"] == 0.4
    assert not any("kind" in row for row in rows)

    summary: dict = {}
    for rec in by_type["summary"]:
        summary.update(_items(rec.summary.update))
    assert summary["test_accuracy"] == 0.8
    assert summary["stages"] == 2
    assert summary["per_depth_accuracy/3"] == 0.8
    assert summary["per_stage/1/busy_fraction"] == 0.8
    assert "method" not in summary and "best" not in summary  # numbers only

    metrics = {
        (m.metric.name or m.metric.glob_name): m.metric.step_metric for m in by_type["metric"]
    }
    assert metrics["*"] == "step", metrics  # every metric plotted against the training step
    assert by_type["exit"][0].exit.exit_code == 0


@pytest.mark.multiprocess  # wandb starts its service process
def test_wandb_failed_run_is_marked(tmp_path, wandb_env):
    with pytest.raises(ZeroDivisionError):
        with make_logger(tmp_path, {}, wandb_cfg()) as rl:
            rl.log(TRAIN)
            1 / 0  # noqa: B018
    (file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    exits = [r.exit for r in read_wandb_records(file) if r.WhichOneof("record_type") == "exit"]
    assert exits and exits[0].exit_code == 1


def test_wandb_missing_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(LoggerError) as err:
        make_logger(tmp_path, {}, wandb_cfg())
    msg = str(err.value)
    assert "logger=wandb" in msg and "\n" not in msg


def test_wandb_init_failure_is_one_line_error(tmp_path, monkeypatch):
    import wandb

    def boom(**kwargs):
        raise RuntimeError("no route to host\nlong traceback text")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.raises(LoggerError) as err:
        make_logger(tmp_path, {}, wandb_cfg("online"))
    msg = str(err.value)
    assert "logger=wandb" in msg and "no route to host" in msg and "\n" not in msg
    # the JSONL file was opened before wandb and is closed again: appending works
    with make_logger(tmp_path, {}, None) as rl:
        rl.log(TRAIN)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [TRAIN]


@dataclass
class _Duck:  # any object with .name / .wandb works, e.g. an OmegaConf node
    name: str = "wandb"
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(mode="offline"))


@pytest.mark.multiprocess  # wandb starts its service process
def test_logger_config_from_omegaconf(tmp_path, wandb_env):
    from omegaconf import OmegaConf

    node = OmegaConf.structured(_Duck())
    with make_logger(tmp_path, OmegaConf.create({"a": {"b": 1}}), node) as rl:
        rl.log(TRAIN)
    (file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    run = next(r.run for r in read_wandb_records(file) if r.WhichOneof("record_type") == "run")
    assert _items(run.config.update)["a"] == {"b": 1}
