"""Typed configuration: one dataclass per concern, registered with hydra's ConfigStore.

The dataclasses are the schema: hydra rejects a misspelt key or a wrong type before any
work starts, and ``__post_init__`` checks ranges and cross-field constraints with messages
that name the full key (``pipeline.stages must be >= 1``). ``OmegaConf.to_object`` at
start-up runs those checks; tests build ``Config(...)`` directly and get the same checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from difflib import get_close_matches
from enum import Enum
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore

from sidpipe.errors import ConfigError

# The allowed values of model.name and data.name (the zoo and the loaders check they match).
MODEL_NAMES = ("mlp", "simplecnn", "vgg11", "resnet18", "vit_tiny", "custom", "gpt")
DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic",
                 "shakespeare", "text")  # fmt: skip
# Byte-level text sets (sidpipe/data/text.py): windows of data.context bytes, 256 classes per
# position; the models that read them are the language models
TEXT_DATASETS = ("shakespeare", "text")
LANGUAGE_MODELS = ("gpt",)
TOKENIZERS = ("bytes", "bpe")  # data.tokenizer of the text sets
BYTES_VOCAB = 256
MAX_VOCAB = 1 << 20  # data.vocab_size: far beyond any LM vocabulary, a guard against typos


def text_vocab(data: Any) -> int:
    """V of a text set's config: 256 bytes, or data.vocab_size for a BPE."""
    return BYTES_VOCAB if getattr(data, "tokenizer", "bytes") == "bytes" else int(data.vocab_size)


# model.head: the belief head of every block (sidpipe/models/heads.py). spatial and conv read
# a convnet's (C,H,W) maps, so the zoo models whose blocks give vectors or tokens take pool
HEAD_KINDS = ("pool", "spatial", "conv")
VECTOR_MODELS = ("mlp", "vit_tiny", "gpt")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class Method(str, Enum):
    sid = "sid"
    bp = "bp"


class Variant(str, Enum):
    blockwise = "blockwise"
    shared = "shared"


class KLDirection(str, Enum):
    forward = "forward"
    reverse = "reverse"


class TopkConsistency(str, Enum):
    even = "even"  # KL against the rebuilt prior, the rest spread evenly
    partition = "partition"  # KL on {each sent class, the rest as one} (method/loss.py)


class Schedule(str, Enum):
    """The backprop pipeline schedules of torch.distributed.pipelining (docs/design.md §6)."""

    gpipe = "gpipe"
    onef1b = "1f1b"
    interleaved_1f1b = "interleaved_1f1b"  # looped placement, several stages per rank
    looped_bfs = "looped_bfs"  # looped placement, breadth first
    interleaved_zb = "interleaved_zb"  # looped, backward split into input and weight grads
    zbv = "zbv"  # zero bubble, V-shaped placement: 2 stages per rank
    dualpipev = "dualpipev"  # DualPipe, V-shaped placement: 2 stages per rank

    @property
    def multi_stage(self) -> bool:
        """A schedule of torch's PipelineScheduleMulti: takes a list of stages per rank."""
        return self not in (Schedule.gpipe, Schedule.onef1b)

    @property
    def v_shape(self) -> bool:
        """Rank r holds stages r and 2S-1-r (the first and last stage both on rank 0)."""
        return self in (Schedule.zbv, Schedule.dualpipev)


# OmegaConf parses an enum override by member *name*, and no Python name can be "1f1b":
# register the value as a name too, so `pipeline.schedule=1f1b` is accepted.
Schedule._member_map_["1f1b"] = Schedule.onef1b


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class TransportBackend(str, Enum):
    auto = "auto"  # NCCL on CUDA, gloo on CPU
    gloo = "gloo"
    nccl = "nccl"
    staged = "staged"  # CUDA tensors copied through pinned host memory over gloo


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class ModelConfig:
    name: str = "mlp"
    blocks: int | None = None  # group the model's natural layers into this many blocks
    # The model's width; None = the architecture's standard. mlp: hidden units (256);
    # resnet18 / vgg11: channels of the first stage (64; later stages 2x, 4x, 8x); simplecnn:
    # channels of the first conv (32); vit_tiny: embedding dim (192, a multiple of its 3 heads);
    # gpt: d_model (128, a multiple of model.heads)
    width: int | None = None
    depth: int = 4  # mlp layers; gpt transformer layers (one natural block each)
    heads: int = 4  # gpt attention heads
    head_hidden: int = 256  # belief-head hidden width; 0 = linear head
    # belief head of every block: pool (global average pool + MLP) | spatial (DGL's MLP-SR:
    # 1x1 convs on a reduced map, 2x2 kept) | conv (InfoPro's: 3x3 stride-2 conv, then FCs)
    head: str = "pool"
    # channels of the spatial/conv heads' convs: max(C, head_width). A floor for narrow early
    # blocks: at 32 the spatial head is <= 5% of every ResNet-18 (width 8) stage's FLOPs at 4
    # blocks, at 128 up to 33% (benchmarks/results/head-cost-2026-12-03)
    head_width: int = 32
    # model=custom: "pkg.module:function" (or "pkg.module.function"), called as
    # function(in_shape=(C, H, W), num_classes=K, **kwargs) -> list of nn.Module layers
    target: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            self.name in MODEL_NAMES,
            f"model.name={self.name!r} is unknown; choose one of {', '.join(MODEL_NAMES)}",
        )
        _check(
            self.blocks is None or self.blocks >= 1,
            f"model.blocks must be >= 1 (got {self.blocks})",
        )
        _check(
            self.width is None or self.width >= 1, f"model.width must be >= 1 (got {self.width})"
        )
        _check(
            not (self.name == "vit_tiny" and self.width is not None and self.width % 3),
            f"model.width={self.width} must be a multiple of vit_tiny's 3 attention heads",
        )
        _check(
            not (self.name == "custom" and self.width is not None),
            "model.width does not apply to model=custom (pass it in model.kwargs)",
        )
        _check(self.depth >= 1, f"model.depth must be >= 1 (got {self.depth})")
        _check(self.heads >= 1, f"model.heads must be >= 1 (got {self.heads})")
        _check(
            not (self.name == "gpt" and (self.width or 128) % self.heads),
            f"model.width={self.width or 128} must be a multiple of model.heads={self.heads}",
        )
        _check(self.head_hidden >= 0, f"model.head_hidden must be >= 0 (got {self.head_hidden})")
        _check(
            self.head in HEAD_KINDS,
            f"model.head={self.head!r} is unknown; choose one of {', '.join(HEAD_KINDS)}",
        )
        _check(self.head_width >= 1, f"model.head_width must be >= 1 (got {self.head_width})")
        _check(
            self.head == "pool" or self.name not in VECTOR_MODELS,
            f"model.head={self.head} reads convnet maps (C,H,W), but model={self.name}'s "
            "blocks give vectors or tokens: use model.head=pool",
        )
        _check(
            (self.name == "custom") == (self.target is not None),
            "model=custom needs model.target=pkg.module:function"
            if self.name == "custom"
            else f"model.target applies to model=custom only (model.name={self.name!r})",
        )


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None  # else $SIDPIPE_DATA, else ./data
    download: bool = False
    val_fraction: float = 0.0  # held out of train for model selection
    label_noise: float = 0.0  # symmetric noise on training labels
    augment: bool | None = None  # None = dataset default (crop+flip for CIFAR)
    subset: int | None = None  # keep the first N training samples (quick runs)
    # text sets: data=text reads this file (any bytes); data=shakespeare reads
    # <root>/shakespeare/shakespeare.txt.gz. A sample is a window of `context` bytes (the
    # model's context length) and their next bytes
    path: str | None = None
    context: int = 128
    # text sets: how text becomes tokens. bytes: V = 256, no file. bpe: a byte-level BPE of
    # data.vocab_size tokens trained on the training split (sidpipe/tokenizer.py), cached;
    # data.tokenizer_path uses that file instead (checked against data.tokenizer_sha256 when
    # set; `sidpipe eval` sets both to the tokenizer an export carries)
    tokenizer: str = "bytes"
    vocab_size: int | None = None
    tokenizer_path: str | None = None
    tokenizer_sha256: str | None = None

    def __post_init__(self) -> None:
        _check(
            self.name in DATASET_NAMES,
            f"data.name={self.name!r} is unknown; choose one of {', '.join(DATASET_NAMES)}",
        )
        _check(
            0.0 <= self.val_fraction < 1.0,
            f"data.val_fraction must be in [0, 1) (got {self.val_fraction})",
        )
        _check(
            0.0 <= self.label_noise < 1.0,
            f"data.label_noise must be in [0, 1) (got {self.label_noise})",
        )
        _check(
            self.subset is None or self.subset >= 1, f"data.subset must be >= 1 (got {self.subset})"
        )
        _check(self.context >= 1, f"data.context must be >= 1 (got {self.context})")
        _check(
            (self.name == "text") == (self.path is not None),
            "data=text needs data.path=FILE (the text to train on)"
            if self.name == "text"
            else f"data.path applies to data=text only (data.name={self.name!r})",
        )
        self._check_tokenizer()

    def _check_tokenizer(self) -> None:
        _check(
            self.tokenizer in TOKENIZERS,
            f"data.tokenizer={self.tokenizer!r} must be one of {', '.join(TOKENIZERS)}",
        )
        text = self.name in TEXT_DATASETS
        _check(
            text or self.tokenizer == "bytes",
            f"data.tokenizer applies to text sets (data=shakespeare or data=text), not "
            f"data={self.name}",
        )
        bpe = self.tokenizer == "bpe"
        if not bpe:
            _check(
                self.vocab_size in (None, BYTES_VOCAB),
                f"data.vocab_size={self.vocab_size} needs data.tokenizer=bpe (bytes have "
                f"{BYTES_VOCAB} tokens)",
            )
            for key in ("tokenizer_path", "tokenizer_sha256"):
                _check(getattr(self, key) is None, f"data.{key} applies to data.tokenizer=bpe")
            return
        _check(self.vocab_size is not None,
               "data.tokenizer=bpe needs data.vocab_size=N (e.g. 2048)")  # fmt: skip
        assert self.vocab_size is not None
        _check(
            BYTES_VOCAB < self.vocab_size <= MAX_VOCAB,
            f"data.vocab_size must be in {BYTES_VOCAB + 1}..{MAX_VOCAB} for a byte-level BPE "
            f"(its first {BYTES_VOCAB} tokens are the bytes; got {self.vocab_size})",
        )
        sha = self.tokenizer_sha256
        _check(
            sha is None or (len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)),
            f"data.tokenizer_sha256 must be 64 lowercase hex digits (got {sha!r})",
        )


@dataclass
class SIDConfig:
    variant: Variant = Variant.blockwise
    alpha: float = 0.5  # weight of label fidelity vs consistency with the previous belief
    kl_direction: KLDirection = KLDirection.forward
    label_smoothing: float = 0.0
    # with pipeline.belief_topk: what the consistency term compares the belief against
    topk_consistency: TopkConsistency = TopkConsistency.even
    modules: int = 5  # number of belief modules of the `shared` variant
    accumulate_steps: int = 1  # messages per optimizer step (docs/design.md §1)

    def __post_init__(self) -> None:
        _check(0.0 <= self.alpha <= 1.0, f"sid.alpha must be in [0, 1] (got {self.alpha})")
        _check(
            0.0 <= self.label_smoothing < 1.0,
            f"sid.label_smoothing must be in [0, 1) (got {self.label_smoothing})",
        )
        _check(self.modules >= 1, f"sid.modules must be >= 1 (got {self.modules})")
        _check(
            self.accumulate_steps >= 1,
            f"sid.accumulate_steps must be >= 1 (got {self.accumulate_steps})",
        )


@dataclass
class PipelineConfig:
    stages: int = 1  # processes; 1 = single process
    # S-1 cut points (block index where each later stage starts), or "auto" (measure, balance)
    partition: Any = None
    auto_bandwidth_gbs: float = 5.0  # partition=auto: cost of sending a message, GB/s
    schedule: Schedule = Schedule.gpipe  # BP only
    microbatches: int = 4  # BP schedules only; a SID message is one batch
    # BP: pipeline stages per rank (None: 1 for gpipe/1f1b, 2 for the multi-stage schedules);
    # the model is cut into pipeline.stages * stages_per_rank stages
    stages_per_rank: int | None = None
    queue_depth: int = 2  # outstanding isends per stage (backpressure)
    timeout_s: float = 120.0  # any wait on another process fails after this
    transport: TransportBackend = TransportBackend.auto
    trace: bool = False  # Chrome-trace JSON of every stage's spans
    reuse_buffers: bool = True  # SID: receive h and p into the same buffers every message
    # torch threads per stage process: N, or auto = this machine's cores (the process's CPU
    # affinity) shared among the stages on it, at least 1 each (sidpipe/runtime/device.py)
    threads: Any = "auto"
    cpu_affinity: bool = False  # pin stage r to cores [r*threads, (r+1)*threads): one "device" each
    cuda_graphs: bool = False  # SID: replay each stage step as CUDA graphs (static shapes)
    # SID: the format beliefs travel in between stages. bf16 halves their bytes (a language
    # model's beliefs, 256 floats per position, are most of a message); lossy: the pipeline
    # then no longer equals the fp32 sequential trainer bit for bit (docs/design.md §9)
    belief_dtype: Precision = Precision.fp32
    # SID: message headers on their own gloo group in host memory, so reading one never waits
    # for the GPU; None = exactly when the payloads go over NCCL
    host_headers: bool | None = None
    # SID: send each belief as its k largest values, their indices and the remaining mass;
    # the receiver spreads that mass evenly over the other V-k classes. Lossy, so off (null)
    # by default; applied at every module boundary, the single-process run too, so the
    # pipeline still equals the sequential run (docs/design.md §9)
    belief_topk: int | None = None
    # A stage that dies (an exception, a kill, a lost node) restarts the whole pipeline from
    # the run's newest verified checkpoint, at most this many times; then the run fails with
    # the last failure's reason. Under torchrun pass the same number as --max-restarts.
    max_restarts: int = 0

    def __post_init__(self) -> None:
        _check(
            isinstance(self.max_restarts, int) and 0 <= self.max_restarts <= 1000,
            f"pipeline.max_restarts must be an integer from 0 to 1000 (got {self.max_restarts})",
        )
        _check(self.stages >= 1, f"pipeline.stages must be >= 1 (got {self.stages})")
        _check(
            self.microbatches >= 1, f"pipeline.microbatches must be >= 1 (got {self.microbatches})"
        )
        _check(self.queue_depth >= 1, f"pipeline.queue_depth must be >= 1 (got {self.queue_depth})")
        # < 1e9 s: every wait takes it (threading caps a timeout at ~9.2e9 s); inf/nan refused
        _check(
            0 < self.timeout_s < 1e9,
            f"pipeline.timeout_s must be a finite number of seconds > 0 and < 1e9 "
            f"(got {self.timeout_s})",
        )
        _check(
            0 < self.auto_bandwidth_gbs < float("inf"),
            f"pipeline.auto_bandwidth_gbs must be a finite number > 0 (got "
            f"{self.auto_bandwidth_gbs})",
        )
        _check(
            self.threads == "auto"
            or (isinstance(self.threads, int) and not isinstance(self.threads, bool)
                and self.threads >= 1),
            f"pipeline.threads must be auto or an integer >= 1 (got {self.threads!r})",
        )  # fmt: skip
        _check(
            self.belief_topk is None or self.belief_topk >= 1,
            f"pipeline.belief_topk must be >= 1 or null (got {self.belief_topk})",
        )
        _check(
            self.belief_topk is None or self.belief_dtype is Precision.fp32,
            "pipeline.belief_topk sends fp32 values; it does not combine with "
            "pipeline.belief_dtype=bf16",
        )
        if isinstance(self.partition, str):
            _check(
                self.partition == "auto",
                f"pipeline.partition={self.partition!r} must be a list of cut points or auto",
            )
        _check(
            self.stages_per_rank is None or self.stages_per_rank >= 1,
            f"pipeline.stages_per_rank must be >= 1 (got {self.stages_per_rank})",
        )


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "none"  # none | cosine (over the run's total steps)
    # Fused Adam/AdamW/SGD kernels: ~6x faster steps on CPU (SID steps once per message).
    fused: bool = True
    # SID: one optimizer per module, as the method is written. Off (default): one optimizer
    # per stage over all its modules; the same updates (these optimizers are elementwise)
    # in one kernel instead of one per module.
    per_module: bool = False

    def __post_init__(self) -> None:
        _check(
            self.name in ("adam", "adamw", "sgd"),
            f"optim.name={self.name!r} must be adam, adamw or sgd",
        )
        # chained comparisons are False for nan, so each of these refuses nan and inf
        _check(0 < self.lr < float("inf"), f"optim.lr must be a finite number > 0 (got {self.lr})")
        _check(
            0 <= self.weight_decay < float("inf"),
            f"optim.weight_decay must be a finite number >= 0 (got {self.weight_decay})",
        )
        _check(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1) (got {self.momentum})")
        _check(
            self.schedule in ("none", "cosine"),
            f"optim.schedule={self.schedule!r} must be none or cosine",
        )


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    max_steps: int | None = None  # stop after this many batches in total
    eval_batch_size: int = 500
    log_every: int = 20  # steps between metrics.jsonl lines
    eval_every_epoch: bool = True
    eval_every_steps: int | None = None  # also evaluate every N steps (time-to-accuracy)
    final_eval: bool = True  # evaluate at the end (benchmarks turn evaluation off)
    data_on_device: bool = True  # the first stage keeps the images on its device (GPU: no copies)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1 (got {self.epochs})")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1 (got {self.batch_size})")
        _check(
            self.max_steps is None or self.max_steps >= 1,
            f"train.max_steps must be >= 1 (got {self.max_steps})",
        )
        _check(
            self.eval_batch_size >= 1,
            f"train.eval_batch_size must be >= 1 (got {self.eval_batch_size})",
        )
        _check(self.log_every >= 1, f"train.log_every must be >= 1 (got {self.log_every})")
        _check(
            self.eval_every_steps is None or self.eval_every_steps >= 1,
            f"train.eval_every_steps must be >= 1 (got {self.eval_every_steps})",
        )


@dataclass
class WandbConfig:
    project: str = "sidpipe"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled

    def __post_init__(self) -> None:
        _check(
            self.mode in ("offline", "online", "disabled"),
            f"logger.wandb.mode={self.mode!r} must be offline, online or disabled",
        )


@dataclass
class LoggerConfig:
    name: str = "console"  # console | wandb (JSONL is always written)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        _check(
            self.name in ("console", "wandb"), f"logger.name={self.name!r} must be console or wandb"
        )


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0 = no checkpoints
    keep_last: int = 2
    dir: str | None = None  # default <run_dir>/checkpoints

    def __post_init__(self) -> None:
        _check(
            self.every_n_steps >= 0,
            f"checkpoint.every_n_steps must be >= 0 (got {self.every_n_steps})",
        )
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1 (got {self.keep_last})")


# sidpipe bench: the SID pipeline, every BP schedule, and the single-process references
BENCH_SCHEMES = ("sid", *(s.value for s in Schedule), "seq_sid", "seq_bp")


@dataclass
class BenchConfig:
    """`sidpipe bench`: SID vs every BP pipeline schedule (and the sequential references)."""

    mode: str = "throughput"  # throughput | tta (time to accuracy) | simulate (one device)
    stages: list[int] = field(default_factory=lambda: [2])  # sweep S
    # sweep M: BP splits a batch of B into M microbatches; SID sends messages of B/M samples,
    # and always also B (M=1: one update per B samples, as BP: the equal-update headline)
    microbatches: list[int] = field(default_factory=lambda: [4])
    batch_size: int = 256  # B of the BP schedules; a SID message is B/M samples
    steps: int = 40  # BP batches per run (SID runs steps*M messages: the same samples)
    warmup: int = 8  # BP batches left out of the timed windows (SID: warmup*M messages)
    windows: int = 4  # timed windows; throughput is their median (min/max reported)
    schemes: list[str] = field(default_factory=lambda: list(BENCH_SCHEMES))
    target_accuracy: float = 0.98  # tta mode
    eval_every: int = 50  # tta mode: BP batches between validation evaluations
    max_epochs: int = 5  # tta mode: give up after this many epochs
    lrs: list[float] = field(default_factory=list)  # tta mode: learning rates to sweep
    seeds: list[int] = field(default_factory=list)  # tta mode: seeds per rate ([] = seed)
    out_dir: str | None = None  # default: the bench's run directory

    def __post_init__(self) -> None:
        _check(
            self.mode in ("throughput", "tta", "simulate"),
            f"bench.mode={self.mode!r} must be throughput, tta or simulate",
        )
        for key in ("stages", "microbatches", "schemes"):  # an empty grid measures nothing
            _check(bool(getattr(self, key)), f"bench.{key}=[] is empty: list at least one")
        bad = [x for x in self.schemes if x not in BENCH_SCHEMES]
        _check(not bad, f"bench.schemes has unknown {bad}; choose from {', '.join(BENCH_SCHEMES)}")
        _check(
            all(0 < lr < float("inf") for lr in self.lrs),
            f"bench.lrs must be finite numbers > 0 (got {list(self.lrs)})",
        )
        for key in ("batch_size", "eval_every", "max_epochs"):
            value = getattr(self, key)
            _check(value >= 1, f"bench.{key} must be >= 1 (got {value})")
        _check(
            0 < self.target_accuracy <= 1,
            f"bench.target_accuracy must be in (0, 1] (got {self.target_accuracy})",
        )
        _check(
            all(s >= 1 for s in self.stages), f"bench.stages must be >= 1 (got {list(self.stages)})"
        )
        _check(
            all(m >= 1 for m in self.microbatches),
            f"bench.microbatches must be >= 1 (got {list(self.microbatches)})",
        )
        for m in self.microbatches:
            _check(
                self.batch_size % m == 0,
                f"bench.batch_size={self.batch_size} is not divisible by bench.microbatches={m}",
            )
        _check(self.steps > self.warmup >= 0, "bench.steps must exceed bench.warmup >= 0")
        _check(
            1 <= self.windows <= self.steps - self.warmup,
            f"bench.windows must be in 1..bench.steps-bench.warmup (got {self.windows})",
        )


STUDY_METHODS = ("sid", "greedy")  # study.methods: the local methods of the blockwise study


@dataclass
class StudyConfig:
    """`sidpipe accuracy`: SID vs BP accuracy studies (sidpipe/bench/accuracy/). Every run of a
    study is `sidpipe train` with the study's overrides; the other keys on the command line
    (optim.lr=..., data.root=...) apply to every run. None = the study's own default."""

    name: str = "all"  # reference | blockwise | noise | alpha | depth | all
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int | None = None  # None: reference 20, the others 10
    batch_size: int = 256
    datasets: list[str] | None = None  # None: blockwise [mnist, fashion_mnist], others [mnist]
    models: list[str] = field(default_factory=lambda: ["mlp", "simplecnn", "vgg11", "resnet18"])
    blocks: list[int] = field(default_factory=lambda: [2, 4, 8])
    # blockwise: the local methods trained against BP on the same blocks. sid = SID (sid.alpha
    # as configured, 0.5 by default); greedy = greedy local learning, SID with sid.alpha=1 (the
    # label term only: each module trained alone, its head still reads the previous belief)
    methods: list[str] = field(default_factory=lambda: ["sid"])
    # blockwise: the belief heads (model.head) each local method runs with; BP keeps the
    # default head. A pool run's name has no head in it, so earlier studies' runs are reused
    heads: list[str] = field(default_factory=lambda: ["pool"])
    # blockwise: train the end-to-end BP baseline too (false: only the local methods, as a
    # study that runs one cell at a time at that cell's own lr does)
    baseline: bool = True
    subset: int | None = None  # data.subset of every run: the first N training samples
    val_fraction: float = 0.1
    noise: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4])
    alphas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    kl: list[str] = field(default_factory=lambda: ["forward", "reverse"])
    # noise/alpha: `shared` (the reference setting) or <model>-b<blocks> (blockwise);
    # None: shared (tiny: mlp-b4 for alpha)
    arch: list[str] | None = None
    threads: int = 1  # torch threads per run
    jobs: int = 1  # runs at a time, in worker processes
    out: str | None = None  # default benchmarks/results/accuracy-<machine>-<date> (in the cwd)
    plan: bool = False  # list the runs, train nothing
    estimate: bool = False  # time estimate_steps batches of each kind of run, project hours
    estimate_steps: int = 6
    tiny: bool = False  # CI: digits, 1 epoch, seed 0, mlp, blocks [2, 4], few alphas/noise

    def __post_init__(self) -> None:
        studies = ("reference", "blockwise", "noise", "alpha", "depth", "all")
        _check(
            self.name in studies,
            f"study.name={self.name!r} must be one of {', '.join(studies)}",
        )
        _check(len(self.seeds) >= 1, "study.seeds must list at least one seed")
        # an empty grid runs nothing (study.blocks=[] is meaningful: the blockwise study's BP
        # runs alone, as cifar10_convnets.sh's bp-epochs part uses it)
        for key in ("models", "noise", "alphas", "kl"):
            _check(bool(getattr(self, key)), f"study.{key}=[] is empty: list at least one")
        _check(self.datasets != [], "study.datasets=[] is empty: list at least one")
        _check(
            self.epochs is None or self.epochs >= 1,
            f"study.epochs must be >= 1 (got {self.epochs})",
        )
        for key in ("batch_size", "threads", "jobs", "estimate_steps"):
            value = getattr(self, key)
            _check(value >= 1, f"study.{key} must be >= 1 (got {value})")
        _check(
            self.subset is None or self.subset >= 1,
            f"study.subset must be >= 1 (got {self.subset})",
        )
        _check(
            0.0 <= self.val_fraction < 1.0,
            f"study.val_fraction must be in [0, 1) (got {self.val_fraction})",
        )
        bad = [d for d in self.datasets or [] if d not in DATASET_NAMES]
        _check(not bad, f"study.datasets has unknown {bad}; choose from {', '.join(DATASET_NAMES)}")
        models = [m for m in MODEL_NAMES if m != "custom"]
        bad = [m for m in self.models if m not in models]
        _check(not bad, f"study.models has unknown {bad}; choose from {', '.join(models)}")
        _check(
            all(b >= 1 for b in self.blocks), f"study.blocks must be >= 1 (got {list(self.blocks)})"
        )
        bad = [m for m in self.methods if m not in STUDY_METHODS]
        _check(
            bool(self.methods) and not bad,
            f"study.methods={list(self.methods)} must list some of {', '.join(STUDY_METHODS)}",
        )
        bad = [h for h in self.heads if h not in HEAD_KINDS]
        _check(
            bool(self.heads) and not bad and len(set(self.heads)) == len(self.heads),
            f"study.heads={list(self.heads)} must list some of {', '.join(HEAD_KINDS)}, each once",
        )
        _check(
            all(0.0 <= r < 1.0 for r in self.noise),
            f"study.noise rates must be in [0, 1) (got {list(self.noise)})",
        )
        _check(
            all(0.0 <= a <= 1.0 for a in self.alphas),
            f"study.alphas must be in [0, 1] (got {list(self.alphas)})",
        )
        bad = [k for k in self.kl if k not in ("forward", "reverse")]
        _check(not bad, f"study.kl has unknown {bad}; choose from forward, reverse")
        for arch in self.arch or []:
            model, sep, blocks = arch.rpartition("-b")
            blockwise = sep and model in models and blocks.isdigit() and int(blocks) >= 1
            _check(
                arch == "shared" or bool(blockwise),
                f"study.arch={arch!r} must be shared or <model>-b<blocks>, e.g. simplecnn-b4",
            )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: Method = Method.sid
    sid: SIDConfig = field(default_factory=SIDConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    device: Device = Device.auto
    precision: Precision = Precision.fp32
    run_dir: str | None = None  # filled from hydra's output dir when None
    progress: bool | None = None  # progress bar; None = only on an interactive terminal
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str | None = None  # auto (newest good checkpoint of this run dir) | PATH
    bench: BenchConfig = field(default_factory=BenchConfig)  # used by `sidpipe bench` only
    study: StudyConfig = field(default_factory=StudyConfig)  # used by sidpipe accuracy only

    @property
    def stage_count(self) -> int:
        """Pipeline stages the model is cut into: one per rank for SID; for BP,
        pipeline.stages_per_rank per rank."""
        return self.pipeline.stages * (self.pipeline.stages_per_rank or 1)

    def __post_init__(self) -> None:
        # Cross-field checks: things no single group can know.
        text, lm = self.data.name in TEXT_DATASETS, self.model.name in LANGUAGE_MODELS
        _check(
            text == lm,
            f"model={self.model.name} reads a text set (data=shakespeare or data=text)"
            if lm
            else f"data={self.data.name} is byte-level text, which only a language model reads "
            f"(model=gpt; got model={self.model.name})",
        )
        _check(
            not (text and self.method is Method.sid and self.sid.variant is Variant.shared),
            "sid.variant=shared is the reference image network; language models train blockwise",
        )
        if self.sid.variant is Variant.shared:  # its network is the reference's, BP's too
            _check(
                self.model.head == "pool",
                f"model.head={self.model.head} applies to blockwise models; sid.variant=shared "
                "is the reference network with its own belief modules",
            )
        if self.method is Method.sid and self.sid.variant is Variant.shared:
            _check(
                self.pipeline.stages == 1,
                "sid.variant=shared trains its extractor with the sum of every module's gradient, "
                "so it cannot be pipelined: use pipeline.stages=1 or sid.variant=blockwise",
            )
        pipe = self.pipeline
        if pipe.stages_per_rank is None:  # resolved here: every rank and the summary agree
            multi = self.method is Method.bp and pipe.schedule.multi_stage and pipe.stages > 1
            pipe.stages_per_rank = 2 if multi else 1
        if self.method is Method.bp and pipe.stages > 1:
            _check(
                self.train.batch_size % pipe.microbatches == 0,
                f"train.batch_size={self.train.batch_size} is not divisible by "
                f"pipeline.microbatches={pipe.microbatches}",
            )
            check_schedule(pipe)
        else:
            _check(
                pipe.stages_per_rank == 1,
                "pipeline.stages_per_rank applies to BP pipelines (method=bp, "
                f"pipeline.stages > 1); got {pipe.stages_per_rank}",
            )
        if isinstance(pipe.partition, str) or pipe.partition is None:
            pass
        else:
            n = self.stage_count
            _check(
                len(pipe.partition) == n - 1,
                f"pipeline.partition={list(pipe.partition)} must list {n - 1} cut points "
                f"(one fewer than the {n} pipeline stages)",
            )
        if self.pipeline.belief_topk is not None:
            _check(
                self.method is Method.sid and self.sid.variant is Variant.blockwise,
                "pipeline.belief_topk compresses the beliefs SID modules pass on; it applies "
                "to method=sid sid.variant=blockwise",
            )
            if text:
                v = text_vocab(self.data)
                _check(
                    self.pipeline.belief_topk < v,
                    f"pipeline.belief_topk={self.pipeline.belief_topk} must be below the "
                    f"vocabulary size {v}",
                )
        _check(
            not (self.pipeline.host_headers and self.method is Method.bp),
            "pipeline.host_headers=true applies to SID pipelines; method=bp sends with "
            "torch.distributed.pipelining's own p2p",
        )
        if self.pipeline.cuda_graphs:
            _check(
                self.method is Method.sid and self.sid.variant is Variant.blockwise,
                "pipeline.cuda_graphs=true graphs the SID blockwise stage step; "
                f"it does not apply to method={self.method.value}"
                + (f" sid.variant={self.sid.variant.value}" if self.method is Method.sid else ""),
            )
            _check(
                self.sid.accumulate_steps == 1,
                "pipeline.cuda_graphs=true needs sid.accumulate_steps=1 (a graph replays one "
                f"fixed backward+step; got {self.sid.accumulate_steps})",
            )
            _check(
                self.optim.fused,
                "pipeline.cuda_graphs=true needs optim.fused=true (a capturable optimizer step)",
            )
            _check(
                self.device is not Device.cpu,
                "pipeline.cuda_graphs=true needs CUDA; it cannot be used with device=cpu",
            )


def check_schedule(pipe: PipelineConfig) -> None:
    """The constraints torch's schedule constructors enforce, refused before any process
    starts (each in one line)."""
    s, m, v, name = pipe.stages, pipe.microbatches, pipe.stages_per_rank, pipe.schedule.value
    if not pipe.schedule.multi_stage:
        _check(v == 1, f"pipeline.schedule={name} runs one stage per rank "
                       f"(pipeline.stages_per_rank={v}); use interleaved_1f1b or looped_bfs "
                       "for several")  # fmt: skip
    if pipe.schedule.v_shape:
        _check(v == 2, f"pipeline.schedule={name} places exactly 2 stages per rank in a V "
                       f"(pipeline.stages_per_rank={v})")  # fmt: skip
    if pipe.schedule is Schedule.onef1b:
        _check(m >= s, f"pipeline.schedule=1f1b needs pipeline.microbatches >= pipeline.stages "
                       f"(got {m} < {s})")  # fmt: skip
    if pipe.schedule in (Schedule.interleaved_1f1b, Schedule.interleaved_zb):
        rounds = max(1, m // s)
        _check(m % rounds == 0, f"pipeline.schedule={name} needs pipeline.microbatches to be a "
                                f"multiple of its rounds max(1, M // S) = {rounds} (got M={m}, "
                                f"S={s})")  # fmt: skip
    if pipe.schedule is Schedule.dualpipev:
        _check(m >= 2 * s, f"pipeline.schedule=dualpipev needs pipeline.microbatches >= "
                           f"2 * pipeline.stages (got {m} < {2 * s})")  # fmt: skip


def register_configs() -> None:
    """Expose the schema to hydra: `base_config` is the root, groups validate against it."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def conf_dir() -> str:
    """The directory of the hydra configs: `conf/` beside the package in a source checkout
    (where people edit them), else the copy the wheel carries as `sidpipe/conf`. Absolute:
    hydra resolves relative paths inside a package as module names."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise ConfigError(f"sidpipe's configs are missing: no conf/config.yaml beside {package}")


CONF_DIR = conf_dir()


def to_config(dcfg: Any) -> Config:
    """Instantiate the dataclasses so every __post_init__ check runs; one-line errors."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_object(dcfg)
    except Exception as e:  # omegaconf wraps our ConfigError in its own exception types
        cause: BaseException = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            if isinstance(cause, ConfigError):
                break
            cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
        raise ConfigError(str(cause).splitlines()[0]) from e
    assert isinstance(cfg, Config)
    return cfg


def _schema_keys(node: type, prefix: str = "") -> tuple[list[str], list[str]]:
    """Every dotted key of a config dataclass (sections too), and the open sections: those
    typed as a dict, which take keys of the user's choosing (model.kwargs)."""
    keys: list[str] = []
    open_sections: list[str] = []
    hints = get_type_hints(node)
    for f in fields(node):
        key, hint = prefix + f.name, hints[f.name]
        keys.append(key)
        if is_dataclass(hint):
            sub_keys, sub_open = _schema_keys(hint, key + ".")  # type: ignore[arg-type]
            keys += sub_keys
            open_sections += sub_open
        elif get_origin(hint) is dict:
            open_sections.append(key)
    return keys, open_sections


SCHEMA_KEYS, OPEN_SECTIONS = _schema_keys(Config)
# the keys that hold a value: a typo is suggested one of these, not a section (`model`)
LEAF_KEYS = [k for k in SCHEMA_KEYS if not any(s.startswith(k + ".") for s in SCHEMA_KEYS)]


def _group_options(group: str) -> list[str] | None:
    """The options of a config group (conf/<group>/*.yaml), None when it is no group of ours."""
    folder = Path(CONF_DIR) / group
    if not folder.is_dir():
        return None
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check_overrides(overrides: list[str]) -> None:
    """Refuse an unknown key or group option in one line that names the nearest valid one.

    hydra's own message for a typo is seven lines whose advice (`To append to your config
    use +model.widht=3`) is wrong for a typo, and `+model.widht=3` is silently accepted; so
    every command checks its overrides against the schema first. Overrides hydra cannot
    parse, hydra's own keys and sweeps of group options are left to hydra's messages."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # bad syntax, or a hydra flag's value: hydra reports those
            continue
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        options = _group_options(key)
        if options is not None:
            value = None if override.is_sweep_override() else override.value()
            if isinstance(value, str) and value not in options:
                near = get_close_matches(value, options, n=1)
                hint = f"did you mean '{key}={near[0]}'? " if near else ""
                raise ConfigError(
                    f"unknown option '{key}={value}' ({hint}choose one of {', '.join(options)})"
                )
            continue
        if key in SCHEMA_KEYS or any(key.startswith(s + ".") for s in OPEN_SECTIONS):
            continue
        near = get_close_matches(key, LEAF_KEYS, n=1)
        hint = f"did you mean '{near[0]}'?" if near else "`sidpipe train --cfg job` lists the keys"
        raise ConfigError(f"unknown key '{key}' ({hint})")


def check_command_line(args: list[str]) -> None:
    """What a hydra app (train, bench) would be given, checked before hydra sees it, so a
    mistake is one line. Plain overrides are composed in full (types, ranges, cross-field
    rules, as `to_config` checks them); with hydra flags (--multirun, --cfg, -cn NAME) only
    the keys are checked and hydra reports the rest."""
    if any(a.startswith("-") for a in args):
        check_overrides(args)
    else:
        compose_config(args)
        check_run_dir(args)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long: not there, checked below
        return False


def check_run_dir(overrides: list[str]) -> Path:
    """hydra.run.dir resolved and checked as hydra will create it (its own failures there are a
    traceback): a broken `${...}`, a path under a file, a name too long or a read-only place
    is one line here. Returns the directory."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        try:
            dcfg = compose(config_name="config", overrides=list(overrides),
                           return_hydra_config=True)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - hydra's own errors, as compose_config says
            raise ConfigError(hydra_error_line(e)) from None
    try:
        run_dir = Path(str(dcfg.hydra.run.dir))
    except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve
        what = " ".join(str(e).splitlines()[0].split())
        raise ConfigError(f"hydra.run.dir cannot be resolved: {what}") from None
    # checked, not created: the default name holds the time, and hydra creates its own
    problem, place = "", run_dir.absolute()
    while place != place.parent and not _exists(place):
        place = place.parent
    name_max = os.pathconf(place, "PC_NAME_MAX") if place.is_dir() else 255
    if not place.is_dir():
        problem = f"{place} is not a directory"
    elif any(len(part.encode()) > name_max for part in run_dir.parts):
        problem = f"a name in it is longer than {name_max} bytes"
    elif not os.access(place, os.W_OK | os.X_OK):
        problem = f"{place} is not writable"
    if problem:
        raise ConfigError(f"cannot use hydra.run.dir={run_dir}: {problem}")
    return run_dir


def compose_config(
    overrides: list[str], config_dir: str = CONF_DIR, config_name: str = "config"
) -> Config:
    """The config `sidpipe train` would run with these overrides, checked (no hydra app);
    config_dir/config_name: another primary config (eval composes on a saved run's)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    check_overrides(overrides)
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        try:
            dcfg = compose(config_name=config_name, overrides=list(overrides))
        except Exception as e:  # hydra's own errors: unknown key, group option, bad syntax
            raise ConfigError(hydra_error_line(e)) from None
    return to_config(dcfg)


def hydra_error_line(e: BaseException) -> str:
    """hydra's error and its cause in one line: 'Could not override 'train.x': Key 'x' not in
    'TrainConfig'', or the options of a missing group member."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    line = lines[0]
    if line.endswith(":") and len(lines) > 1:  # "In 'x': ... while composing config:"
        line += " " + lines[1]
    if e.__cause__ is not None:
        line += ": " + str(e.__cause__).strip().splitlines()[0]
    options = getattr(e, "options", None)
    if options:
        line += f" (choose one of {', '.join(options)})"
    return line


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain, JSON-friendly dict of a config (enums as their values)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


register_configs()  # importing the schema makes it known to hydra (compose, the apps, tests)
