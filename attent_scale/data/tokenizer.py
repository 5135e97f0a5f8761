"""SentencePiece tokenizer: deterministic training on a corpus, loading, and newline-preserving encode."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from attent_scale.errors import UserError

NEWLINE = "\u23ce"  # "⏎": stands for "\n" inside the tokenizer so line structure survives tokenization
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    """A loaded SentencePiece model; `encode` maps "\\n" to the newline piece when the model has one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            ok = self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise UserError(f"{self.path}: cannot load sentencepiece model ({exc})") from None
        if not ok:
            raise UserError(f"{self.path}: cannot load sentencepiece model")
        self.vocab_size = int(self.sp.GetPieceSize())
        nl = self.sp.PieceToId(NEWLINE)
        self.newline_symbol = NEWLINE if nl != self.sp.unk_id() else None
        self.eos_id = int(self.sp.eos_id())
        if self.eos_id < 0:
            raise UserError(f"{self.path}: tokenizer has no EOS piece")
        pad = int(self.sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        if self.newline_symbol is not None:
            text = text.replace("\n", self.newline_symbol)
        return self.sp.EncodeAsIds(text)

    def decode(self, ids: Iterable[int]) -> str:
        text = self.sp.DecodeIds([int(i) for i in ids])
        return text.replace(self.newline_symbol, "\n") if self.newline_symbol else text


def _lines(docs: Iterable[object]) -> Iterator[str]:
    for doc in docs:
        for line in doc.text.split("\n"):  # type: ignore[attr-defined]
            if line.strip():
                yield line


class _Reader:
    """The sentence iterator handed to sentencepiece: it keeps the exception the corpus raised (a reader
    error, a stop signal), which sentencepiece would otherwise cut down to the last line of a traceback."""

    def __init__(self, docs: Iterable[object]) -> None:
        self.docs = docs
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from _lines(self.docs)
        except BaseException as exc:
            self.error = exc
            raise


def train_tokenizer(
    docs: Iterable[object],
    out_path: Path,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    seed: int = 0,
    max_sentences: int = 2_000_000,
) -> Path:
    """Train a SentencePiece model on the lines of `docs`, deterministically; write it to `out_path`."""
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"--model-type {model_type!r}: expected bpe or unigram")
    if vocab_size < 16:
        raise UserError(f"--vocab-size {vocab_size}: must be at least 16")
    buf = io.BytesIO()  # model_writer keeps the output path out of the model: byte-identical re-runs
    spm.set_random_generator_seed(seed)
    reader = _Reader(docs)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(reader),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            user_defined_symbols=[NEWLINE],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            num_threads=1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
    except BaseException as exc:
        if reader.error is not None:  # the corpus's own error (FILE:LINE: ...), not sentencepiece's
            raise reader.error from None
        if not isinstance(exc, RuntimeError):
            raise
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
        if small:  # byte_fallback alone needs 256 pieces, plus the corpus's characters
            need = small.group(1)
            raise UserError(f"--vocab-size {vocab_size}: too small, the corpus needs {need}") from None
        limit = re.search(r"value <= (\d+)", msg)
        if limit or "Vocabulary size" in msg:
            hint = f" (at most {limit.group(1)})" if limit else ""
            raise UserError(f"--vocab-size {vocab_size}: too large for this corpus{hint}") from None
        raise UserError(f"tokenizer training failed: {msg}") from None
    out_path.write_bytes(buf.getvalue())
    return out_path
