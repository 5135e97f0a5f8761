"""Benchmark regimes (issues 21 and 29): train/val .jsonl inputs for `shards build` with duplicated, noisy,
span-noised, naturally repeated or clean documents, their clean twin (the oracle's train data), a sidecar
saying what each train document is, and the map to sample ids.

    python tools/ablations/regimes.py --regime dup --rate 0.4 --max-copies 16 --corpus stdlib --out DIR
    attent-scale shards build DIR/train.jsonl --val-input DIR/val.jsonl -o DIR/shards --seq-len 64 ...
    python tools/ablations/regimes.py kinds DIR/shards DIR/kinds.json [--selection RUN/selection.jsonl]

The pool of original documents is cut, exact- and near-deduplicated (word 5-gram shingles), and split
into val/train by original document before anything is copied, so val is clean and shares no copy or
near-copy with train. Everything is seeded: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REGIMES = ("dup", "noise", "clean", "span", "repeats")
CORPORA = ("stdlib", "prose", "stdlib-qa", "stdlib-doc")
# kinds of a train document (and, by majority of its target tokens, of a sample)
KINDS = ("original", "duplicated", "copy", "noise", "swapped", "span", "repeat")
SAFE_KINDS = ("copy", "noise", "swapped")  # safe to drop: a further occurrence, or unlearnable
# original: appears once; duplicated: the first occurrence of a document that has copies; copy: a further
# occurrence (exact or edited); noise: random-token or shuffled-word text; swapped: a prompt with another
# record's response; span: a document with noise spans inside it (its other words are text: not safe to
# drop whole); repeat: a natural near-copy of an earlier train document (regime repeats: val shares such
# text, so it is not known to be safe to drop)
# what the oracle (uniform on the clean twin, oracle.jsonl) trains, per regime; clean has no twin
ORACLE_RULE = {"dup": "each original once (the copies dropped)", "noise": "the originals (noise dropped)",
               "span": "every document with its noise spans undone",
               "repeats": "the train documents less their natural near-copies (deduplicated)"}
SIDE_FORMAT = "attent-scale-regime/1"
SHINGLE = 5  # words per shingle for the near-copy test
NEAR = 0.5  # a document sharing >= this share of its shingles with another counts as a near-copy
PROSE_DIRS = ("/usr/share/common-licenses", "/usr/share/doc")


class RegimeError(Exception):
    """Bad input for the tool: printed as one line, exit 2."""


# ---------------------------------------------------------------------------------------- corpora

def _chunks(text: str, doc_chars: int) -> list[str]:
    """`text` cut at line ends into pieces of about `doc_chars` characters (the last may be shorter)."""
    out, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        size += len(line)
        if size >= doc_chars:
            out.append("".join(cur))
            cur, size = [], 0
    if cur and "".join(cur).strip():
        out.append("".join(cur))
    return [c for c in out if c.strip()]


def _stdlib_files() -> list[Path]:
    from attent_scale.data.corpus import stdlib_files
    return stdlib_files()


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _prose_files() -> list[Path]:
    files: list[Path] = []
    for root in PROSE_DIRS:
        r = Path(root)
        if not r.is_dir():
            continue
        pattern = "*/copyright" if r.name == "doc" else "*"
        files += sorted(p for p in r.glob(pattern) if p.is_file() and not p.is_symlink())
    return files


def _qa_records() -> Iterator[dict[str, str]]:
    """Instruction records from the stdlib: prompt = a function's signature, response = its docstring."""
    for path in _stdlib_files():
        src = _read(path)
        if src is None:
            continue
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        mod = path.stem
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 80:
                continue
            yield {"prompt": f"What does {mod}.{node.name}({ast.unparse(node.args)}) do?", "response": doc}


def _doc_records() -> Iterator[dict[str, str]]:
    """Instruction records from the stdlib: "Write the docstring of `module.func(args)`." -> its first
    docstring paragraph (attent_scale/data/instructions.py, the SmolLM2 demo's pairs: short responses that
    fit an 80-token sample)."""
    from attent_scale.data.instructions import docstring_pairs
    for pair in docstring_pairs():
        yield {"prompt": pair["prompt"], "response": pair["response"]}


def _join(rec: dict[str, str]) -> str:
    return f"{rec['prompt']}\n{rec['response']}"


def _jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file; RegimeError on bad JSON."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise RegimeError(f"{path}:{n}: not JSON ({exc.msg})") from None


def _records(corpus: str, doc_chars: int) -> Iterable[dict[str, str]]:
    if corpus == "stdlib-qa":
        recs = _qa_records()
    elif corpus == "stdlib-doc":
        recs = _doc_records()
    elif corpus in ("stdlib", "prose"):
        files = _stdlib_files() if corpus == "stdlib" else _prose_files()
        recs = ({"text": c} for f in files if (t := _read(f)) for c in _chunks(t, doc_chars))
    else:
        path = Path(corpus)
        if path.is_dir():
            recs = ({"text": c} for f in sorted(p for p in path.rglob("*") if p.is_file())
                    if (t := _read(f)) for c in _chunks(t, doc_chars))
        elif path.is_file():
            recs = []
            for n, rec in _jsonl(path):
                if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and \
                        isinstance(rec.get("response"), str):
                    recs.append({"prompt": rec["prompt"], "response": rec["response"]})
                elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    recs.append({"text": rec["text"]})
                else:
                    raise RegimeError(f"{path}:{n}: need a string field 'text' or 'prompt' and 'response'")
        else:
            raise RegimeError(f"--corpus {corpus}: not one of {', '.join(CORPORA)}, a directory or a file")
    return recs


def load_pool(corpus: str, *, doc_chars: int, max_bytes: int, max_docs: int | None = None,
              dedup: bool = True) -> tuple[list[dict[str, str]], int]:
    """The distinct original documents of `corpus` (a name in CORPORA, or a directory of text files / a
    .jsonl file with "text" or "prompt"/"response"), in a fixed order, up to `max_bytes` of text and
    `max_docs` documents, without exact or near copies of an earlier one (`NEAR` of its word 5-grams
    seen); and how many were skipped. `dedup=False` keeps the near copies (regime repeats: the corpus's
    own repeats, as it has them)."""
    out, total, skipped = [], 0, 0
    seen: set[int] = set()
    for rec in _records(corpus, doc_chars):
        if max_docs is not None and len(out) >= max_docs:
            break
        text = rec.get("text") or _join(rec)
        if not text.strip():
            continue
        s = shingles(text)
        if dedup and len(s & seen) >= NEAR * len(s):
            skipped += 1
            continue
        total += len(text.encode())
        if total > max_bytes and out:
            break
        seen |= s
        out.append(rec)
    if not out:
        raise RegimeError(f"--corpus {corpus}: no documents found")
    return out, skipped


# ---------------------------------------------------------------------------------------- near-copies

def normalize(text: str) -> str:
    """Lower-case words only: copies with whitespace edits normalize alike."""
    return " ".join(re.findall(r"\w+", text.lower()))


def _h(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")  # not salted


def shingles(text: str) -> set[int]:
    """Hashes of the word 5-grams of `text` (the whole normalized text for a shorter one)."""
    words = normalize(text).split()
    if len(words) < SHINGLE:
        return {_h(" ".join(words))}
    return {_h(" ".join(words[i:i + SHINGLE])) for i in range(len(words) - SHINGLE + 1)}


def overlap(a: str, seen: set[int]) -> float:
    """Share of `a`'s shingles found in `seen`."""
    s = shingles(a)
    return len(s & seen) / len(s)


# ---------------------------------------------------------------------------------------- regimes

_TOKEN = re.compile(r"(\s+)")


def small_edit(text: str, rng: random.Random, rate: float = 0.02) -> str:
    """`text` with a few word drops, adjacent-word swaps and whitespace changes (about `rate` per word,
    at least one edit); line structure is kept."""
    parts = _TOKEN.split(text)  # words at even, separators at odd positions
    n_words = (len(parts) + 1) // 2
    edits = max(1, round(rate * n_words))
    for _ in range(edits):
        op = rng.randrange(3)
        if len(parts) < 5 and op != 2:
            op = 2
        if op == 0:  # drop a word and the separator after it
            i = 2 * rng.randrange((len(parts) - 1) // 2)
            del parts[i:i + 2]
        elif op == 1:  # swap two neighbouring words
            i = 2 * rng.randrange((len(parts) - 1) // 2)
            if i + 2 < len(parts):
                parts[i], parts[i + 2] = parts[i + 2], parts[i]
        else:  # whitespace: double a separator, or add a trailing space
            seps = list(range(1, len(parts), 2))
            if seps:
                j = rng.choice(seps)
                parts[j] = parts[j] + (" " if "\n" not in parts[j] else "\n")
            else:
                parts.append(" ")
    return "".join(parts)


def noise_text(text: str, vocab: Sequence[str], rng: random.Random, how: str) -> str:
    """Unlearnable text of about `text`'s length: its words shuffled (`shuffle`), or words drawn
    uniformly from the corpus vocabulary (`random`)."""
    words = text.split()
    if how == "shuffle":
        rng.shuffle(words)
    else:
        words = [rng.choice(vocab) for _ in words]
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    return "\n".join(lines) + "\n"


def span_noise(text: str, vocab: Sequence[str], rng: random.Random, rate: float,
               span_words: tuple[int, int] = (2, 8), kinds: Sequence[str] = ("random", "shuffle")
               ) -> tuple[str, list[list[int]]]:
    """`text` with about `rate` of its words replaced inside the document, in spans of `span_words`
    consecutive words (a random length in that range), whitespace and line structure kept: the words of
    a `random` span drawn uniformly from the corpus vocabulary, those of a `shuffle` span drawn from the
    document's own words (the right vocabulary in the wrong order); the span kinds alternate. Returns the
    text and the [start, end) character ranges of its noise spans (neighbouring spans merged)."""
    parts = _TOKEN.split(text)  # words at even, separators at odd positions ('' at the ends)
    words = [i for i in range(0, len(parts), 2) if parts[i]]
    n = len(words)
    lo, hi = span_words
    segs, j = [], 0
    while j < n:  # consecutive segments of lo..hi words, a random subset of them replaced
        length = rng.randint(lo, hi)
        segs.append((j, min(n, j + length)))
        j += length
    order = list(range(len(segs)))
    rng.shuffle(order)
    chosen, covered = [], 0
    for k in order:
        if covered >= rate * n:
            break
        chosen.append(k)
        covered += segs[k][1] - segs[k][0]
    own = [parts[i] for i in words]
    noisy = set()
    for c, k in enumerate(sorted(chosen)):
        how = kinds[c % len(kinds)]
        for w in range(*segs[k]):
            parts[words[w]] = rng.choice(vocab) if how == "random" else rng.choice(own)
            noisy.add(words[w])
    out, spans, pos = [], [], 0
    for i, piece in enumerate(parts):
        if i in noisy:
            if spans and i - 2 in noisy:  # the separator between two noise words joins them
                spans[-1][1] = pos + len(piece)
            else:
                spans.append([pos, pos + len(piece)])
        out.append(piece)
        pos += len(piece)
    return "".join(out), spans


def _derangement(n: int, rng: random.Random) -> list[int]:
    """A permutation of range(n) with no fixed point (n >= 2)."""
    order = list(range(n))
    rng.shuffle(order)
    out = list(range(n))
    for i in range(n):  # one cycle through a shuffled order: order[i] takes order[i + 1]'s
        out[order[i]] = order[(i + 1) % n]
    return out


def _text(rec: dict[str, str]) -> str:
    return rec.get("text") or _join(rec)


def build_regime(pool: list[dict[str, str]], regime: str, *, rate: float, max_copies: int, seed: int,
                 val_fraction: float, exact_share: float = 0.5, edit_rate: float = 0.02,
                 noise_kinds: Sequence[str] = ("random", "shuffle"), val_docs: int | None = None,
                 ref_docs: int = 0, doc_rate: float = 1.0, span_words: tuple[int, int] = (2, 8)
                 ) -> dict[str, Any]:
    """Split `pool` (distinct documents: `load_pool`) into val (clean), a clean reference slice of
    `ref_docs` and train originals by document, then apply `regime` to train. `val_docs` fixes the val
    count (else `val_fraction` of the pool). Returns {"train", "val", "ref", "oracle", "kind", "source",
    "edited", "spans", "counts", ...} where train[i] is a record, kind[i] its KINDS name, source[i] the
    index of its original in the train originals, spans[i] its noise character ranges (regime span), and
    oracle the clean twin of train (ORACLE_RULE; None for clean)."""
    if regime not in REGIMES:
        raise RegimeError(f"--regime {regime}: one of {', '.join(REGIMES)}")
    rng = random.Random(seed)
    docs = pool
    order = list(range(len(docs)))
    rng.shuffle(order)
    if val_docs is not None:
        n_val = val_docs
    else:
        n_val = max(1, round(val_fraction * len(docs))) if val_fraction > 0 else 0
    if ref_docs < 0 or n_val < 0:
        raise RegimeError(f"--val-docs {n_val} / --ref-docs {ref_docs}: must not be negative")
    if len(docs) - n_val - ref_docs < 2:
        raise RegimeError(f"corpus too small: {len(docs)} distinct documents for {n_val} val, {ref_docs} ref "
                          "and at least 2 train")
    val = [docs[i] for i in sorted(order[:n_val])]
    ref = [docs[i] for i in sorted(order[n_val:n_val + ref_docs])]
    originals = [docs[i] for i in sorted(order[n_val + ref_docs:])]
    n = len(originals)
    kind = ["original"] * n
    source = list(range(n))
    edited = [False] * n
    spans: list[list[list[int]]] = [[] for _ in range(n)]
    train: list[dict[str, str]] = [dict(r) for r in originals]
    is_qa = all("prompt" in r for r in originals)
    if regime == "dup":
        if not 0 < rate < 1 or max_copies < 2:
            raise RegimeError(f"--rate {rate} / --max-copies {max_copies}: need 0 < rate < 1 and "
                              "max-copies >= 2")
        chosen = sorted(rng.sample(range(n), round(rate * n)))
        for i in chosen:
            kind[i] = "duplicated"
            for _ in range(rng.randint(2, max_copies) - 1):  # k occurrences in all, 2 <= k <= max_copies
                rec = dict(originals[i])
                exact = rng.random() < exact_share
                key = "response" if is_qa else "text"
                if not exact:
                    rec[key] = small_edit(rec[key], rng, edit_rate)
                train.append(rec)
                kind.append("copy")
                source.append(i)
                edited.append(not exact)
                spans.append([])
    elif regime == "noise":
        if not 0 < rate < 1:
            raise RegimeError(f"--rate {rate}: need 0 < rate < 1")
        chosen = sorted(rng.sample(range(n), max(2, round(rate * n))))
        if is_qa:  # responses swapped between the chosen records
            perm = _derangement(len(chosen), rng)
            for a, b in zip(chosen, perm, strict=True):
                train[a] = {"prompt": originals[a]["prompt"], "response": originals[chosen[b]]["response"]}
                kind[a] = "swapped"
        else:
            vocab = sorted({w for r in originals for w in r["text"].split()})
            for j, i in enumerate(chosen):
                how = noise_kinds[j % len(noise_kinds)]
                train[i] = {"text": noise_text(originals[i]["text"], vocab, rng, how)}
                kind[i] = "noise"
                edited[i] = True
    elif regime == "span":
        if is_qa or not 0 < rate < 1 or not 0 < doc_rate <= 1 or not 1 <= span_words[0] <= span_words[1]:
            raise RegimeError(f"--regime span: needs text documents, 0 < --rate {rate} < 1, 0 < --doc-rate "
                              f"{doc_rate} <= 1 and 1 <= --span-words {span_words[0]},{span_words[1]}, "
                              "ordered")
        vocab = sorted({w for r in originals for w in r["text"].split()})
        for i in sorted(rng.sample(range(n), max(1, round(doc_rate * n)))):
            text, where = span_noise(originals[i]["text"], vocab, rng, rate, span_words, noise_kinds)
            train[i] = {"text": text}
            kind[i], edited[i], spans[i] = "span", True, where
    perm = list(range(len(train)))
    rng.shuffle(perm)  # copies spread over the file, not next to their original
    first = {}
    for p in perm:  # the first occurrence in file order is the "duplicated" one
        if kind[p] in ("duplicated", "copy") and source[p] not in first:
            first[source[p]] = p
    for p in range(len(train)):
        if kind[p] in ("duplicated", "copy"):
            kind[p] = "duplicated" if first[source[p]] == p else "copy"
    train = [train[p] for p in perm]
    kind = [kind[p] for p in perm]
    source = [source[p] for p in perm]
    edited = [edited[p] for p in perm]
    spans = [spans[p] for p in perm]
    train_sh: set[int] = set()
    if regime == "repeats":  # the corpus's own near-copies, in file order: a later one is a repeat
        for i, rec in enumerate(train):
            s = shingles(_text(rec))
            if len(s & train_sh) >= NEAR * len(s):
                kind[i] = "repeat"
            train_sh |= s
    else:
        for rec in train:
            train_sh |= shingles(_text(rec))
    counts = {k: kind.count(k) for k in KINDS}
    oracle = None
    if regime in ("dup", "span"):
        oracle = [dict(originals[s]) for s, k in zip(source, kind, strict=True) if k != "copy"]
    elif regime in ("noise", "repeats"):
        oracle = [dict(rec) for rec, k in zip(train, kind, strict=True) if k == "original"]
    # the pool skips near-copies of *earlier* documents only: a val (or ref) document can still be pieced
    # together from several later train documents (licence paragraphs); those leave val. Regime repeats
    # keeps them: there the held-out text shares the corpus's repeats by design, and says how many.
    shared = sum(overlap(_text(v), train_sh) >= NEAR for v in val)
    clean_val = val if regime == "repeats" else [v for v in val if overlap(_text(v), train_sh) < NEAR]
    val_sh = set().union(*(shingles(_text(v)) for v in clean_val)) if clean_val else set()
    clean_ref = ref if regime == "repeats" else [
        r for r in ref if overlap(_text(r), train_sh) < NEAR and overlap(_text(r), val_sh) < NEAR]
    return {"train": train, "val": clean_val, "ref": clean_ref, "oracle": oracle, "kind": kind,
            "source": source, "edited": edited, "spans": spans, "counts": counts, "originals": n,
            "val_dropped": len(val) - len(clean_val), "ref_dropped": len(ref) - len(clean_ref),
            "val_shares_train": shared if regime == "repeats" else 0}


def _line(rec: dict[str, str], tag: str, src: int) -> str:
    out = dict(rec)
    if "text" not in out:
        out["text"] = _join(rec)
    out["regime_tag"] = tag
    out["source"] = src
    return json.dumps(out, ensure_ascii=False) + "\n"


def write_regime(out: Path, result: dict[str, Any], settings: dict[str, Any]) -> Path:
    """OUT/train.jsonl, OUT/val.jsonl, the clean twin OUT/oracle.jsonl (what the `oracle` arm trains on,
    with the same val.jsonl and the train shards' tokenizer), the clean reference slice OUT/ref.jsonl
    (when asked for) and the sidecar OUT/kinds.json; the sidecar's path."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for rec, k, s in zip(result["train"], result["kind"], result["source"], strict=True):
            f.write(_line(rec, k, s))
    with open(out / "val.jsonl", "w", encoding="utf-8") as f:
        for rec in result["val"]:
            f.write(_line(rec, "val", -1))
    files = {}
    for name in ("oracle", "ref"):
        path = out / f"{name}.jsonl"
        if result.get(name):
            with open(path, "w", encoding="utf-8") as f:
                for rec in result[name]:
                    f.write(_line(rec, name, -1))
            files[name] = path.name  # the sidecar names the files of this build (none: a null)
    regime = settings.get("regime")
    side = {"format": SIDE_FORMAT, "settings": settings, "train_file": "train.jsonl", "val_file": "val.jsonl",
            "oracle_file": files.get("oracle"), "oracle_rule": ORACLE_RULE.get(regime),
            "oracle_docs": len(result.get("oracle") or []), "ref_file": files.get("ref"),
            "ref_docs": len(result.get("ref") or []), "ref_dropped_near_train": result.get("ref_dropped", 0),
            "counts": result["counts"], "originals": result["originals"], "val_docs": len(result["val"]),
            "near_copies_removed": settings.get("near_copies_removed", 0),
            "val_dropped_near_train": result["val_dropped"],
            "val_shares_train": result.get("val_shares_train", 0), "kind": result["kind"],
            "source": result["source"], "edited": result["edited"],
            # regime span: per train line, the [start, end) character ranges of its noise (token ground truth)
            "noise_spans": result.get("spans") if regime == "span" else None}
    path = out / "kinds.json"
    path.write_text(json.dumps(side) + "\n")
    return path


# ---------------------------------------------------------------------------------------- sample ids

def _load_side(sidecar: str | Path) -> tuple[dict[str, Any], list[str]]:
    path = Path(sidecar)
    try:
        side = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RegimeError(f"{path}: cannot read sidecar ({exc})") from None
    if side.get("format") != SIDE_FORMAT:
        raise RegimeError(f"{path}: not a regimes sidecar (format {side.get('format')!r})")
    texts = [json.loads(line)["text"] for line in
             (path.parent / side["train_file"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(texts) != len(side["kind"]):
        raise RegimeError(f"{path}: {len(side['kind'])} kinds but {len(texts)} lines in {side['train_file']}")
    return side, texts


def kinds_of_samples(manifest_dir: str | Path, sidecar: str | Path) -> np.ndarray:
    """The KINDS name of every train sample id of the shards in `manifest_dir` built from the sidecar's
    train.jsonl: the kind holding most of the sample's target tokens (window j's targets are stream tokens
    j*seq_len+1 .. j*seq_len+seq_len). Document lengths come from re-tokenizing with the shards' tokenizer,
    checked against the manifest's document and sample counts. Instruction (SFT) shards: a sample is one
    record, so its kind is the record's."""
    from attent_scale.data.builder import split_of
    from attent_scale.data.manifest import Manifest
    from attent_scale.data.tokenizer import Tokenizer

    m = Manifest.load(manifest_dir, check_files=False)
    side, texts = _load_side(sidecar)
    if m.sft:
        return _sft_kinds(m, Path(sidecar).parent / side["train_file"], side["kind"])
    build = m.raw.get("build", {})
    keep = [True] * len(texts)
    if not build.get("val_input"):  # a hash split: some train.jsonl lines went to val/ref
        vf, rf = float(build.get("val_fraction", 0.0)), float(build.get("ref_fraction", 0.0))
        keep = [split_of(t, vf, rf) == "train" for t in texts]
    tok = Tokenizer(Path(manifest_dir) / m.raw["tokenizer"]["file"])
    lengths = np.array([len(tok.encode(t)) + 1 for t, k in zip(texts, keep, strict=True) if k], np.int64)
    codes = np.array([KINDS.index(k) for k, ok in zip(side["kind"], keep, strict=True) if ok], np.int8)
    docs = int(m.raw["splits"]["train"].get("documents", len(lengths)))
    if docs != len(lengths):
        raise RegimeError(f"{manifest_dir}: {docs} train documents in the manifest, {len(lengths)} in "
                          f"{sidecar}'s train file: not built from it")
    t = m.seq_len
    tokens = int(lengths.sum())
    n_full = (tokens - 1) // t
    n = n_full + (1 if tokens - n_full * t >= 2 else 0)
    if n != m.num_samples("train"):
        raise RegimeError(f"{manifest_dir}: {m.num_samples('train')} train samples, but {sidecar}'s train "
                          f"file re-tokenizes to {n} (another tokenizer or encoding?)")
    per_token = np.repeat(codes, lengths)
    targets = np.full(n * t, -1, np.int16)
    targets[: tokens - 1] = per_token[1:]
    counts = np.stack([(targets.reshape(n, t) == c).sum(1) for c in range(len(KINDS))], axis=1)
    return np.array(KINDS, dtype=object)[counts.argmax(1)].astype(str)


def _sft_kinds(m: Any, train_file: Path, kinds: list[str]) -> np.ndarray:
    """Instruction shards: one example a sample, in file order, less the examples the builder skipped (no
    response token within seq_len + 1), found by rendering each record as the builder does."""
    from attent_scale.data.builder import SftSpec, _prefix_ids, sft_example, split_of
    from attent_scale.data.tokenizer import load_tokenizer

    build = m.raw.get("build", {})
    spec = SftSpec(**{k: build["sft"][k] for k in ("prompt_field", "response_field", "chat_template")})
    tk = load_tokenizer(m.tokenizer_source)
    prefix = _prefix_ids(tk)
    vf, rf = float(build.get("val_fraction", 0.0)), float(build.get("ref_fraction", 0.0))
    out = []
    for (_, rec), kind in zip(_jsonl(train_file), kinds, strict=True):
        prompt, response = rec[spec.prompt_field], rec[spec.response_field]
        if not build.get("val_input") and split_of(f"{prompt}\0{response}", vf, rf) != "train":
            continue
        tokens, mask, _ = sft_example(tk, prompt, response, spec, m.seq_len, prefix)
        if len(tokens) >= 2 and any(mask[1:]):
            out.append(kind)
    if len(out) != m.num_samples("train"):
        raise RegimeError(f"{m.dir}: {m.num_samples('train')} train examples, but {train_file} renders to "
                          f"{len(out)} (another tokenizer or seq_len?)")
    return np.array(out, dtype=str)


def dropped_ids(selection: Any, num_samples: int) -> list[tuple[str, np.ndarray]]:
    """(label, dropped ids) per selection: `selection` is an array of dropped ids, a boolean kept mask of
    length num_samples, a .npy/.txt file of dropped ids, or a selection.jsonl whose records carry
    "dropped_ids", "selected_ids" or "selection_bits" (hex, little bit order)."""
    if isinstance(selection, np.ndarray):
        if selection.dtype == bool:
            return [("mask", np.flatnonzero(~selection))]
        return [("ids", selection.astype(np.int64))]
    path = Path(selection)
    if path.suffix == ".npy":
        return [(path.name, np.load(path).astype(np.int64))]
    if path.suffix == ".txt":
        return [(path.name, np.loadtxt(path, dtype=np.int64, ndmin=1))]
    out = []
    for _, rec in _jsonl(path):
        label = f"epoch {rec.get('epoch')} step {rec.get('step')}"
        if rec.get("dropped_ids") is not None:
            out.append((label, np.asarray(rec["dropped_ids"], np.int64)))
        elif rec.get("selected_ids") is not None:
            kept = np.zeros(num_samples, bool)
            kept[np.asarray(rec["selected_ids"], np.int64)] = True
            out.append((label, np.flatnonzero(~kept)))
        elif rec.get("selection_bits") is not None:
            bits = np.frombuffer(bytes.fromhex(rec["selection_bits"]), np.uint8)
            kept = np.unpackbits(bits, count=num_samples, bitorder="little").astype(bool)
            out.append((label, np.flatnonzero(~kept)))
    if not out:
        raise RegimeError(f"{path}: no record with dropped_ids, selected_ids or selection_bits (pass the "
                          "dropped ids as a .npy/.txt file instead)")
    return out


def summarize_dropped(selection: Any, kinds: np.ndarray, *, file: Any = None) -> list[dict[str, Any]]:
    """Print, per selection, the share of dropped samples by kind (and copy|noise: copy, noise or swapped)
    next to each kind's share of all train samples; return the rows."""
    file = file or sys.stdout
    kinds = np.asarray(kinds).astype(str)
    n = len(kinds)
    base = {k: float((kinds == k).mean()) for k in KINDS}
    rows = []
    print("selection            dropped  " + "  ".join(f"{k:>10}" for k in KINDS) + "  copy|noise", file=file)
    print(f"{'(all train)':<20} {n:>7}  " + "  ".join(f"{base[k]:>10.1%}" for k in KINDS)
          + f"  {sum(base[k] for k in SAFE_KINDS):>10.1%}", file=file)
    for label, ids in dropped_ids(selection, n):
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise RegimeError(f"{label}: dropped id {int(ids.max())} outside the {n} train samples")
        d = kinds[ids]
        share = {k: float((d == k).mean()) if len(d) else 0.0 for k in KINDS}
        either = sum(share[k] for k in SAFE_KINDS)
        rows.append({"selection": label, "dropped": int(len(ids)), "share": share, "copy_or_noise": either})
        print(f"{label:<20} {len(ids):>7}  " + "  ".join(f"{share[k]:>10.1%}" for k in KINDS)
              + f"  {either:>10.1%}", file=file)
    return rows


# ---------------------------------------------------------------------------------------- CLI

def _build_cmd(args: argparse.Namespace) -> None:
    if args.max_docs is not None and args.max_docs < 3:
        raise RegimeError(f"--max-docs {args.max_docs}: must be at least 3")
    try:
        lo, hi = (int(x) for x in args.span_words.split(","))
    except ValueError:
        raise RegimeError(f"--span-words {args.span_words!r}: need MIN,MAX words, e.g. 2,8") from None
    kinds = tuple(k for k in args.noise_kinds.split(",") if k)
    if not kinds or set(kinds) - {"random", "shuffle"}:
        raise RegimeError(f"--noise-kinds {args.noise_kinds!r}: a comma list of random, shuffle")
    pool, skipped = load_pool(args.corpus, doc_chars=args.doc_chars, max_bytes=args.max_bytes,
                              max_docs=args.max_docs, dedup=args.regime != "repeats")
    result = build_regime(pool, args.regime, rate=args.rate, max_copies=args.max_copies, seed=args.seed,
                          val_fraction=args.val_fraction, exact_share=args.exact_share,
                          edit_rate=args.edit_rate, noise_kinds=kinds, val_docs=args.val_docs,
                          ref_docs=args.ref_docs, doc_rate=args.doc_rate, span_words=(lo, hi))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "func")}
    settings["near_copies_removed"] = skipped
    side = write_regime(Path(args.out), result, settings)
    c = result["counts"]
    noise_share = ""
    if args.regime == "span":
        chars = sum(b - a for doc in result["spans"] for a, b in doc)
        total = sum(len(_text(r)) for r in result["train"])
        noise_share = f"; {chars / total:.1%} of train characters in noise spans"
    shared = f", {result['val_shares_train']} of them near-copies of train text" if args.regime == "repeats" \
        else ""
    ref = f", {len(result['ref'])} ref docs ({result['ref_dropped']} dropped)" if args.ref_docs else ""
    print(f"{args.regime} on {args.corpus}: {result['originals']} train originals, {len(result['val'])} val "
          f"docs{shared} ({skipped} near-copies skipped in the corpus, {result['val_dropped']} val docs "
          f"dropped as near-copies of train){ref}; train "
          f"{len(result['train'])} docs: " + ", ".join(f"{k} {c[k]}" for k in KINDS if c[k]) + noise_share)
    oracle = f", oracle.jsonl ({len(result['oracle'])} docs: {ORACLE_RULE[args.regime]})" \
        if result["oracle"] else ""
    print(f"wrote {args.out}/train.jsonl, val.jsonl{oracle}{', ref.jsonl' if ref else ''}, {side.name}; "
          f"next: attent-scale shards build {args.out}/train.jsonl --val-input {args.out}/val.jsonl -o "
          f"{args.out}/shards ... (the oracle's shards: the same from oracle.jsonl, the same --val-input, "
          "--tokenizer the train shards' tokenizer)")


def _kinds_cmd(args: argparse.Namespace) -> None:
    kinds = kinds_of_samples(args.shards, args.sidecar)
    if args.save:
        np.save(args.save, kinds)
    counts = {k: int((kinds == k).sum()) for k in KINDS}
    print(f"{len(kinds)} train samples: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    if args.selection:
        summarize_dropped(args.selection, kinds)


def main(argv: Iterable[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "kinds":
        p = argparse.ArgumentParser(prog="regimes.py kinds", description="the kinds of a shard set's samples")
        p.add_argument("shards")
        p.add_argument("sidecar")
        p.add_argument("--selection", help="selection.jsonl, or a .npy/.txt of dropped ids")
        p.add_argument("--save", help="write the kinds array as .npy")
        p.set_defaults(func=_kinds_cmd)
        argv = argv[1:]
    else:
        p = argparse.ArgumentParser(prog="regimes.py", description=__doc__.split("\n")[0])
        p.add_argument("--regime", choices=REGIMES, required=True)
        p.add_argument("--rate", type=float, default=0.4,
                       help="dup: share of train originals that get copies; noise: share replaced; span: "
                            "share of each document's words replaced")
        p.add_argument("--max-copies", type=int, default=16, help="dup: occurrences per duplicated doc, 2..N")
        p.add_argument("--exact-share", type=float, default=0.5, help="dup: share of copies left exact")
        p.add_argument("--edit-rate", type=float, default=0.02, help="dup: edits per word of an edited copy")
        p.add_argument("--corpus", default="stdlib",
                       help=f"{', '.join(CORPORA)}, a directory of text files, or a .jsonl (text or "
                            "prompt/response)")
        p.add_argument("--doc-chars", type=int, default=2000, help="documents cut at line ends to about this")
        p.add_argument("--max-bytes", type=int, default=1_500_000, help="text of the original pool")
        p.add_argument("--max-docs", type=int, default=None, help="and at most this many originals (records)")
        p.add_argument("--val-fraction", type=float, default=0.1, help="share of originals held out as val")
        p.add_argument("--val-docs", type=int, default=None, help="this many originals as val (not a share)")
        p.add_argument("--ref-docs", type=int, default=0,
                       help="a clean reference slice of this many originals (ref.jsonl), disjoint from both")
        p.add_argument("--doc-rate", type=float, default=1.0,
                       help="span: share of documents given noise spans")
        p.add_argument("--span-words", default="2,8", help="span: MIN,MAX words per noise span")
        p.add_argument("--noise-kinds", default="random,shuffle",
                       help="noise/span: random (corpus vocabulary) and/or shuffle (the document's own "
                            "words)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True)
        p.set_defaults(func=_build_cmd)
    args = p.parse_args(argv)
    try:
        args.func(args)
    except RegimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
