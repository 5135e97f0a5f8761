"""Shard-build tokenizers: SentencePiece (trained here, newline-preserving) or a Hugging Face / GGUF one."""

from __future__ import annotations

import hashlib
import io
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from attent_scale.errors import UserError

HF_DIR = "tokenizer"  # a shard set's saved Hugging Face tokenizer (save_pretrained) lives in DIR/tokenizer/
HF_FILE = "tokenizer.json"
# end-of-text tokens a bare tokenizer.json (no tokenizer_config.json beside it) may name
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>", "<|eot_id|>", "[SEP]")
NEWLINE = "\u23ce"  # "⏎": stands for "\n" inside the tokenizer so line structure survives tokenization
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MAX_LINE_BYTES = 4192  # sentencepiece's max_sentence_length: it skips longer lines when it trains
_LOCATION = re.compile(r"^(?P<file>.*?)(:\d+|:row \d+|:sample .*|@\d+)?$")  # Document.name -> its file


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's files (sorted relative names and their hashes)."""
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


class Tokenizer:
    """A loaded SentencePiece model; `encode` maps "\\n" to the newline piece when the model has one."""

    kind = "sentencepiece"
    chat_template = None

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

    def encode_docs(self, texts: Sequence[str]) -> list[list[int]]:
        """Each document's ids as the shards store them: its tokens, then EOS."""
        return [self.encode(t) + [self.eos_id] for t in texts]

    def save(self, out_dir: Path) -> Path:
        """Copy the model into the shard directory; the stored path."""
        out = out_dir / "tokenizer.model"
        out.write_bytes(self.path.read_bytes())
        return out


class HFTokenizer:
    """A Hugging Face fast tokenizer (a directory, a tokenizer.json or a .gguf file's tokenizer): its own
    BOS/EOS/pad and chat template, no newline remapping; ids from its batch encoder."""

    newline_symbol = None

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.kind = "gguf" if self.path.suffix == ".gguf" else "hf"
        self.tk = _load_hf(self.path)
        self.vocab_size = len(self.tk)
        eos = self.tk.eos_token_id
        if eos is None:
            raise UserError(f"{self.path}: tokenizer has no EOS token")
        self.eos_id = int(eos)
        self.pad_id = int(self.tk.pad_token_id) if self.tk.pad_token_id is not None else self.eos_id
        self.bos_id = self.tk.bos_token_id
        self.chat_template = getattr(self.tk, "chat_template", None) or None

    def encode(self, text: str) -> list[int]:
        """The text's ids, no special tokens added: decode(encode(t)) == t."""
        return list(self.tk(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of many texts at once (the fast tokenizer's batch encoder)."""
        return [list(ids) for ids in self.tk(list(texts), add_special_tokens=False)["input_ids"]] \
            if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False)

    def encode_docs(self, texts: Sequence[str]) -> list[list[int]]:
        """Each document's ids as the shards store them: with the special tokens the tokenizer adds
        itself (a BOS for Llama, none for GPT-2), then EOS unless it already ends the document."""
        out = []
        for ids in self.tk(list(texts), add_special_tokens=True)["input_ids"] if texts else []:
            ids = list(ids)
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
            out.append(ids)
        return out

    def chat(self, prompt: str, response: str) -> tuple[str, str]:
        """(prompt text, response text) of the chat template for user=prompt, assistant=response: their
        concatenation is the whole rendered conversation."""
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        full = self.tk.apply_chat_template(msgs, tokenize=False)
        head = self.tk.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        if not full.startswith(head):
            raise UserError(f"{self.path}: the chat template's prompt part is not a prefix of the whole "
                            "conversation; cannot tell prompt from response tokens")
        return head, full[len(head):]

    def save(self, out_dir: Path) -> Path:
        """save_pretrained into OUT/tokenizer/ (what AutoTokenizer and an export load); the stored path."""
        out = out_dir / HF_DIR
        self.tk.save_pretrained(str(out))
        return out


def _load_hf(path: Path) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if path.suffix == ".gguf":
            tk = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        elif path.is_dir():
            tk = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        elif (path.parent / "tokenizer_config.json").is_file():  # its directory says what EOS is
            tk = AutoTokenizer.from_pretrained(str(path.parent), local_files_only=True)
        else:
            tk = PreTrainedTokenizerFast(tokenizer_file=str(path))
            if tk.eos_token is None:
                specials = [t.content for t in tk.backend_tokenizer.get_added_tokens_decoder().values()
                            if t.special]
                found = next((n for n in _EOS_NAMES if n in specials), None)
                if found is None:
                    raise UserError(f"{path}: names no end-of-text token ({', '.join(_EOS_NAMES[:4])}, ...);"
                                    " pass its directory with a tokenizer_config.json")
                tk.eos_token = found
    except UserError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, json and tokenizers errors
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot load Hugging Face tokenizer ({msg})") from None
    if not getattr(tk, "is_fast", False):
        raise UserError(f"{path}: not a fast (tokenizer.json) tokenizer")
    return tk


def is_hf_tokenizer(path: Path) -> bool:
    """A Hugging Face tokenizer (a directory holding tokenizer.json or tokenizer_config.json, a
    tokenizer.json or a .gguf file) rather than a SentencePiece model."""
    if path.is_dir():
        return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return path.suffix in (".json", ".gguf")


def load_tokenizer(path: str | Path) -> Tokenizer | HFTokenizer:
    """The tokenizer at `path`: a SentencePiece .model, or a Hugging Face directory / tokenizer.json /
    .gguf file; UserError naming the path when it does not load."""
    p = Path(path)
    return HFTokenizer(p) if is_hf_tokenizer(p) else Tokenizer(p)


class _Reader:
    """The sentence iterator handed to sentencepiece: it keeps the exception the corpus raised (a reader
    error, a stop signal), which sentencepiece would otherwise cut down to the last line of a traceback,
    and counts the lines sentencepiece will skip as too long (with the longest one's place)."""

    def __init__(self, docs: Iterable[object]) -> None:
        self.docs = docs
        self.error: BaseException | None = None
        self.lines = self.long = self.longest = 0
        self.longest_at = ""

    def _lines(self) -> Iterator[str]:
        for doc in self.docs:
            for line in doc.text.split("\n"):  # type: ignore[attr-defined]
                if not line.strip():
                    continue
                self.lines += 1
                if len(line) * 4 > MAX_LINE_BYTES and (n := len(line.encode("utf-8"))) > MAX_LINE_BYTES:
                    self.long += 1
                    if n > self.longest:
                        self.longest, self.longest_at = n, str(getattr(doc, "name", "?"))
                yield line

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._lines()
        except BaseException as exc:
            self.error = exc
            raise

    def skipped(self) -> str:
        """'N line(s) over MAX bytes, which it skips (the longest, B bytes, at LOC)', or ''."""
        if not self.long:
            return ""
        return (f"{self.long} line(s) over {MAX_LINE_BYTES} bytes, which it skips (the longest, "
                f"{self.longest} bytes, at {self.longest_at})")


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
            max_sentence_length=MAX_LINE_BYTES,
        )
    except BaseException as exc:
        if reader.error is not None:  # the corpus's own error (FILE:LINE: ...), not sentencepiece's
            raise reader.error from None
        if not isinstance(exc, RuntimeError):
            raise
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if reader.lines == reader.long and reader.long:  # sentencepiece: INTERNAL [!sentences_.empty()]
            where = _LOCATION.match(reader.longest_at)["file"]  # type: ignore[index]
            raise UserError(f"{where}: no line of text sentencepiece can train a tokenizer on: "
                            f"{reader.skipped()}; break the text into lines, or pass --tokenizer") from None
        small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
        if small:  # byte_fallback alone needs 256 pieces, plus the corpus's characters
            need = small.group(1)
            raise UserError(f"--vocab-size {vocab_size}: too small, the corpus needs {need}") from None
        limit = re.search(r"value <= (\d+)", msg)
        if limit or "Vocabulary size" in msg:
            hint = f" (at most {limit.group(1)})" if limit else ""
            raise UserError(f"--vocab-size {vocab_size}: too large for this corpus{hint}") from None
        raise UserError(f"tokenizer training failed: {msg}") from None
    if reader.long:
        print(f"attent-scale: warning: tokenizer training: {reader.skipped()}; it learned from the other "
              f"{reader.lines - reader.long} line(s)", file=sys.stderr)
    out_path.write_bytes(buf.getvalue())
    return out_path
