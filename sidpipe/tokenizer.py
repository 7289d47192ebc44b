"""Text tokenizers of the language models: raw bytes (V = 256, no file) or a byte-level BPE.

The BPE is trained with Hugging Face `tokenizers` on the *training split only*, so no byte of
validation or test shapes the vocabulary. Training is deterministic for a given corpus and
size (tested: two trainings give the same file), so a cached file is only a shortcut: its
name holds the vocabulary size, the sha256 of the training bytes and a settings tag, and a
resumed run that finds no cache trains the same file again.

A tokenizer file that comes from elsewhere (an export, `data.tokenizer_path`) is untrusted
input: it is read as data only (tokenizers' JSON, parsed by its Rust code; nothing in it
runs), its sha256 is checked against what the export's sidecar or the config records, and
every failure is one DataError line.

Bits per byte need each token's length in bytes (`token_bytes`): with a byte-level BPE every
character of a token's string stands for exactly one byte (GPT-2's byte-to-unicode table).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sidpipe.config import BYTES_VOCAB
from sidpipe.errors import DataError

log = logging.getLogger(__name__)

# Bumped whenever the training settings below change: part of every cached file's name, so
# a cache written under other settings is never taken for this one.
SETTINGS = "bl1"  # byte-level pre-tokenizer (GPT-2 regex), min_frequency 1, no special tokens
MAX_FILE_BYTES = 256 * 2**20  # a tokenizer file larger than this is refused before parsing


@dataclass(frozen=True)
class TextTokenizer:
    """kind: "bytes" or "bpe"; vocab_size: the model's V (data.vocab_size for bpe, which the
    trained vocabulary never exceeds); token_bytes: int64 (V,), the bytes each id decodes
    to (0 for ids the tokenizer does not use); path/sha256: the file (bpe)."""

    kind: str
    vocab_size: int
    token_bytes: Tensor
    path: Path | None = None
    sha256: str | None = None
    impl: Any = None  # the tokenizers.Tokenizer (bpe)
    text: str | None = None  # the file's JSON, exactly (bpe): what a run and an export keep

    def encode(self, text: bytes) -> Tensor:
        """Token ids of `text` (1-D; uint8 for bytes, int32 for bpe)."""
        if self.impl is None:
            if not text:  # frombuffer refuses an empty buffer
                return torch.zeros(0, dtype=torch.uint8)
            return torch.frombuffer(bytearray(text), dtype=torch.uint8)
        ids = self.impl.encode(text.decode("utf-8")).ids
        return torch.tensor(ids, dtype=torch.int32)

    def decode(self, ids: list[int]) -> bytes:
        """The bytes that `ids` stand for (a partial UTF-8 character stays partial)."""
        if self.impl is None:
            return bytes(ids)
        inverse = _inverse_vocab(self.impl)
        return b"".join(bytes(_UNICODE_TO_BYTE[c] for c in inverse.get(i, "")) for i in ids)


def bytes_tokenizer() -> TextTokenizer:
    return TextTokenizer("bytes", BYTES_VOCAB, torch.ones(BYTES_VOCAB, dtype=torch.int64))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- byte-level map


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's table (the one tokenizers' ByteLevel uses): printable bytes stand for
    themselves, the others for the code points from 256 on, so every byte is one character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


def _inverse_vocab(impl: Any) -> dict[int, str]:
    return {i: s for s, i in impl.get_vocab().items()}


# ----------------------------------------------------------------------------- training


def train_bpe(corpus: bytes, vocab_size: int) -> str:
    """The tokenizer JSON of a byte-level BPE of at most `vocab_size` tokens trained on
    `corpus` (UTF-8). Every byte is in the initial alphabet, so any UTF-8 text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([corpus.decode("utf-8")], trainer=trainer)
    return tok.to_str()


def cache_dir() -> Path:
    """Where trained tokenizers are kept: $SIDPIPE_CACHE/tokenizers, else
    $XDG_CACHE_HOME/sidpipe/tokenizers, else ~/.cache/sidpipe/tokenizers. Not beside the
    data: data folders are often shared and read-only. Each run also keeps its own copy."""
    root = os.environ.get("SIDPIPE_CACHE")
    if root:
        return Path(root).expanduser() / "tokenizers"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "sidpipe" / "tokenizers"


def cache_name(corpus_sha: str, vocab_size: int) -> str:
    return f"bpe-v{vocab_size}-c{corpus_sha[:16]}-{SETTINGS}.json"


def write_atomic(path: Path, text: str) -> None:
    """Several stage processes may write the same (identical) file at once: each writes its
    own temporary file and renames it, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a cache is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def trained_bpe(corpus: bytes, vocab_size: int) -> TextTokenizer:
    """The BPE of `corpus`: from the cache when a file there parses and its metadata matches,
    else trained now and cached (a cache that cannot be written is only a warning)."""
    corpus_sha = sha256_bytes(corpus)
    path = cache_dir() / cache_name(corpus_sha, vocab_size)
    meta_path = path.with_suffix(".meta.json")
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            tok = load_bpe(path, meta.get("sha256"), vocab_size)
            if meta.get("corpus_sha256") == corpus_sha:
                return tok
        except (DataError, OSError, ValueError, AttributeError, TypeError) as e:
            log.warning("retraining the tokenizer: the cached %s is unusable (%s)", path, e)
    text = train_bpe(corpus, vocab_size)
    sha = sha256_bytes(text.encode("utf-8"))
    meta = {"kind": "bpe", "vocab_size": vocab_size, "corpus_sha256": corpus_sha,
            "corpus_bytes": len(corpus), "settings": SETTINGS, "sha256": sha}  # fmt: skip
    try:
        write_atomic(path, text)
        write_atomic(meta_path, json.dumps(meta, indent=1) + "\n")
    except OSError as e:
        log.warning("cannot cache the tokenizer in %s (%s); using it uncached", path.parent, e)
        return _parse_bpe(text, sha, vocab_size, None)
    return _parse_bpe(text, sha, vocab_size, path)


# ----------------------------------------------------------------------------- loading


def load_bpe(path: Path, sha256: str | None, vocab_size: int) -> TextTokenizer:
    """A tokenizer file read as data: size-capped, checked against `sha256` (when given)
    before it is parsed, then parsed by tokenizers and checked to be a byte-level BPE of at
    most vocab_size tokens. Every failure is one DataError line naming the file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"tokenizer file {path} not found") from None
    except OSError as e:
        raise DataError(f"cannot read tokenizer file {path}: {e.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise DataError(f"tokenizer file {path} is {size} bytes: too large for a tokenizer")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read tokenizer file {path}: {e.strerror}") from None
    sha = sha256_bytes(raw)
    if sha256 is not None and sha != sha256:
        raise DataError(
            f"tokenizer file {path} does not match its record: sha256 {sha[:16]}... where "
            f"{sha256[:16]}... was recorded (a damaged or different tokenizer)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"tokenizer file {path} is not a tokenizer (not UTF-8 JSON)") from None
    return _parse_bpe(text, sha, vocab_size, path)


def _parse_bpe(text: str, sha: str, vocab_size: int, path: Path | None) -> TextTokenizer:
    where = f"tokenizer file {path}" if path is not None else "the trained tokenizer"
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise DataError(f"{where} is not a tokenizer (bad JSON: {e.msg})") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise DataError(f"{where} is not a BPE tokenizer (no BPE 'model' section)")
    # Bits per byte and decoding read a token's string as bytes, one character each: only
    # a plain byte-level BPE keeps that true (a normalizer would change the text, an added
    # token would not be byte-level)
    stages = {k: (spec.get(k) or {}).get("type") if isinstance(spec.get(k) or {}, dict) else "?"
              for k in ("normalizer", "pre_tokenizer", "decoder")}  # fmt: skip
    if stages != {"normalizer": None, "pre_tokenizer": "ByteLevel", "decoder": "ByteLevel"} or (
        spec.get("added_tokens")
    ):
        raise DataError(
            f"{where} is not a plain byte-level BPE (normalizer {stages['normalizer']}, "
            f"pre-tokenizer {stages['pre_tokenizer']}, decoder {stages['decoder']}, "
            f"{len(spec.get('added_tokens') or [])} added tokens)"
        )
    from tokenizers import Tokenizer

    try:
        impl = Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad input
        first = " ".join(str(e).split())[:160]
        raise DataError(f"{where} is not a usable tokenizer ({first})") from None
    vocab = impl.get_vocab()
    if not vocab or max(vocab.values()) >= vocab_size:
        top = max(vocab.values()) + 1 if vocab else 0
        raise DataError(
            f"{where} has {top} token ids but data.vocab_size={vocab_size}: it was built for "
            "another vocabulary size"
        )
    token_bytes = torch.zeros(vocab_size, dtype=torch.int64)
    for s, i in vocab.items():
        if any(c not in _UNICODE_TO_BYTE for c in s):
            raise DataError(f"{where} is not a byte-level BPE (token {s[:20]!r})")
        token_bytes[i] = len(s)
    singles = {s for s in vocab if len(s) == 1}
    if len(singles) < 256:
        raise DataError(f"{where} lacks some of the 256 single bytes: it cannot encode any text")
    return TextTokenizer("bpe", vocab_size, token_bytes, path, sha, impl, text)


def text_tokenizer(cfg: Any, corpus: bytes | None) -> TextTokenizer:
    """The tokenizer data config `cfg` asks for: bytes; the BPE file data.tokenizer_path
    (checked against data.tokenizer_sha256 when set); or the BPE trained on `corpus` (the
    training split), cached."""
    kind = getattr(cfg, "tokenizer", "bytes")
    if kind == "bytes":
        return bytes_tokenizer()
    vocab_size = int(cfg.vocab_size)
    given = getattr(cfg, "tokenizer_path", None)
    if given:
        return load_bpe(Path(given).expanduser().absolute(),
                        getattr(cfg, "tokenizer_sha256", None), vocab_size)  # fmt: skip
    if corpus is None:
        raise DataError("data.tokenizer=bpe without data.tokenizer_path needs the training text")
    return trained_bpe(corpus, vocab_size)


def encode_cached(tok: TextTokenizer, text: bytes) -> Tensor:
    """tok.encode(text), kept in the cache for a BPE: encoding Shakespeare's 5 MB takes
    seconds, and every stage process of a pipeline loads the data. Keyed by the tokenizer's
    and the text's sha256; a cached array is read without pickle and used only if it has
    the right dtype and ids and decodes to exactly len(text) bytes, else encoded again."""
    if tok.impl is None or not text:
        return tok.encode(text)
    import numpy as np

    key = sha256_bytes(f"{tok.sha256}:{sha256_bytes(text)}".encode())[:32]
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        try:
            ids = torch.from_numpy(np.load(path, allow_pickle=False))
            ok = (ids.dtype == torch.int32 and ids.ndim == 1 and ids.numel() > 0
                  and 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
                  and int(tok.token_bytes[ids.long()].sum()) == len(text))  # fmt: skip
            if ok:
                return ids
        except (OSError, ValueError) as e:
            log.warning("encoding again: the cached %s is unusable (%s)", path, e)
    ids = tok.encode(text)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, ids.numpy(), allow_pickle=False)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot cache the encoded text in %s (%s)", path.parent, e)
    return ids


def keep_in_run(tok: TextTokenizer, run_dir: Path) -> None:
    """A run keeps its tokenizer as run_dir/tokenizer.json (what `sidpipe export` carries).
    A resumed run must tokenize as it did: a different file there is one error line."""
    if tok.kind == "bytes":
        return
    assert tok.text is not None and tok.sha256 is not None
    mine = run_dir / "tokenizer.json"
    if mine.is_file():
        have = sha256_bytes(mine.read_bytes())
        if have != tok.sha256:
            raise DataError(
                f"{mine} (sha256 {have[:16]}...) is not this run's tokenizer (sha256 "
                f"{tok.sha256[:16]}...): the run directory was trained with other text or settings"
            )
        return
    write_atomic(mine, tok.text)
