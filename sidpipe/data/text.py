"""The text datasets: a file's bytes cut, in order, into train | validation | test splits of
tokens (bytes, or a BPE trained on the training split).

  shakespeare    <root>/shakespeare/shakespeare.txt.gz: byte-level text (see TextSplit)
  text           data.path: any file, read as bytes (gzip if it ends in .gz)
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

from sidpipe.data.bundle import DataBundle, TextSplit, _one_line, resolve_root
from sidpipe.errors import DataConfigError, DataError
from sidpipe.tokenizer import encode_cached, text_tokenizer

TEST_FRACTION = 0.05  # text sets: the last 5% of the bytes are the test split


def _read_text(cfg: Any) -> tuple[Path, bytes]:
    if cfg.name == "text":
        if not getattr(cfg, "path", None):
            raise DataConfigError("data=text needs data.path=FILE (the text to train on)")
        path = Path(cfg.path).expanduser().absolute()
    else:
        path = resolve_root(getattr(cfg, "root", None)) / "shakespeare" / "shakespeare.txt.gz"
    if not path.is_file():
        hint = ("point data.root / SIDPIPE_DATA at a folder that holds shakespeare/"
                if cfg.name == "shakespeare" else "check data.path")  # fmt: skip
        raise DataError(f"text file {path} not found ({hint})")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {_one_line(e) or type(e).__name__}") from e
    if not raw:
        raise DataError(f"text file {path} is empty")
    return path, raw


def _char_boundary(raw: bytes, i: int) -> int:
    """The first position >= i that starts a UTF-8 character (continuation bytes are
    10xxxxxx): a BPE split point must not cut a character in two."""
    while i < len(raw) and raw[i] & 0xC0 == 0x80:
        i += 1
    return i


def _load_text(cfg: Any, name: str, val_fraction: float, seed: int) -> DataBundle:
    """Contiguous splits, in file order: train | validation | test (the last 5%). Windows
    never cross a split boundary, so no byte of one split is a target in another. With a BPE
    (data.tokenizer=bpe) the splits are cut on bytes (moved to a character boundary), the
    tokenizer is trained on the training split's bytes only, and each split is encoded on
    its own, so no token straddles two splits."""
    for key in ("label_noise", "augment"):
        if getattr(cfg, key, None):
            raise DataConfigError(f"data.{key} does not apply to text (data={name})")
    path, raw = _read_text(cfg)
    context = int(getattr(cfg, "context", 128))
    bpe = getattr(cfg, "tokenizer", "bytes") == "bpe"
    n = len(raw)
    n_test = int(round(TEST_FRACTION * n))
    n_val = int(round(val_fraction * n))
    cuts = [n - n_test - n_val, n - n_test]
    if bpe:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path} is not UTF-8 text (byte {e.start}): data.tokenizer=bpe reads UTF-8; "
                "data.tokenizer=bytes reads any file"
            ) from None
        cuts = [_char_boundary(raw, c) for c in cuts]
    spans = {"training": (0, cuts[0]), "validation": (cuts[0], cuts[1]), "test": (cuts[1], n)}
    tok = text_tokenizer(cfg, raw[: cuts[0]] if bpe else None)
    token_bytes = tok.token_bytes if bpe else None
    tokens = {k: encode_cached(tok, raw[a:b]) for k, (a, b) in spans.items()}
    subset = getattr(cfg, "subset", None)
    if subset is not None:  # the first N training windows
        tokens["training"] = tokens["training"][: subset * context + 1]
    unit = "tokens" if bpe else "bytes"
    for what, ids in tokens.items():
        if what == "validation" and not n_val:
            continue
        if ids.numel() < context + 1:
            raise DataConfigError(
                f"data.context={context} is longer than the {what} split of {path} "
                f"({ids.numel()} {unit}; a window needs context+1): use a shorter data.context "
                "or a longer text"
            )
    splits = {k: TextSplit(ids.clone(), context, token_bytes) for k, ids in tokens.items()}
    return DataBundle(
        name=name,
        train=splits["training"],
        val=splits["validation"] if n_val else None,
        test=splits["test"],
        in_shape=(context,),
        num_classes=tok.vocab_size,
        mean=(),
        std=(),
        augment=False,
        noise_rate=0.0,
        tokenizer=tok,
    )


def text_bytes_per_token(data: DataBundle) -> float | None:
    """A text set's mean bytes per training token (tokens/s times it is text bytes/s, which
    compares across tokenizers); None for images."""
    return data.train.bytes_per_token() if isinstance(data.train, TextSplit) else None
