"""`attent-scale shards build|merge|inspect`: the command line of the data path."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from attent_scale.data import remote
from attent_scale.data.builder import build_shards, default_workers, merge_parts, parse_part
from attent_scale.data.manifest import Manifest, ShardInfo, file_problem
from attent_scale.data.samples import MASK_FIELD, decode, read_samples, sample_key
from attent_scale.data.tokenizer import sha256_file, tree_sha256
from attent_scale.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("shards", help="build and inspect token shards")
    sub = p.add_subparsers(dest="shards_command", required=True)

    b = sub.add_parser("build", help="tokenize a corpus into webdataset tar shards plus manifest.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("inputs", nargs="*",
                   help="files, directories or globs: .jsonl[.gz|.zst], .parquet, .arrow, webdataset .tar, "
                        "save_to_disk directories, plain text (none: embedded stdlib corpus)")
    b.add_argument("-o", "--out", required=True,
                   help="output directory, or a URL (s3://, gs://, http(s)://) to upload the built set to")
    b.add_argument("--glob", default="*", help="file pattern inside input directories (recursive)")
    b.add_argument("--text-field", default=None,
                   help="the field holding the text in record inputs (None: 'text'); given, files of "
                        "no record extension are read as JSONL too")
    b.add_argument("--max-bytes", type=int, default=None, help="stop after this many bytes of text")
    b.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    b.add_argument("--seq-len", type=int, default=1024, help="tokens per sample (windows hold seq_len + 1)")
    b.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary to train")
    b.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece model")
    b.add_argument("--tokenizer", default=None,
                   help="use this tokenizer instead of training one: a sentencepiece .model, a Hugging Face "
                        "tokenizer directory or tokenizer.json, or a .gguf file (its tokenizer)")
    b.add_argument("--prompt-field", default=None,
                   help="instruction data (any record input format): the prompt field; one example a "
                        "sample, the loss on the response only")
    b.add_argument("--response-field", default=None, help="instruction data: the response field")
    b.add_argument("--chat-template", action="store_true",
                   help="render each example with the tokenizer's chat template (user=prompt, "
                        "assistant=response)")
    b.add_argument("--val-fraction", type=float, default=0.01, help="documents to val, by hash of the text")
    b.add_argument("--ref-fraction", type=float, default=0.0,
                   help="documents to a held-out 'ref' split (for a reference model), by hash of the text")
    b.add_argument("--val-input", action="append", default=None, metavar="PATH",
                   help="the val split is this input's documents (any input format; repeatable), "
                        "instead of --val-fraction's hash split")
    b.add_argument("--ref-input", action="append", default=None, metavar="PATH",
                   help="the ref split is this input's documents (repeatable), instead of --ref-fraction")
    b.add_argument("--shard-size-mb", type=float, default=64.0, help="start a new shard at this size")
    b.add_argument("--samples-per-shard", type=int, default=None, help="or at this many samples")
    b.add_argument("--seed", type=int, default=0, help="tokenizer training seed")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.add_argument("--workers", type=int, default=None,
                   help=f"processes that tokenize and write (default: all cores, here {default_workers()})")
    b.add_argument("--part", default=None, metavar="I/N",
                   help="tokenize only the I-th of N slices of the input files into a part directory "
                        "(needs --tokenizer); join the parts with `shards merge`")
    b.set_defaults(func=cmd_build)

    g = sub.add_parser("merge", help="join the part directories of a `build --part I/N` into one shard set")
    g.add_argument("parts", nargs="+", help="part directories 0..N-1 (any order)")
    g.add_argument("-o", "--out", required=True, help="output directory, or a URL to upload the set to")
    g.add_argument("--workers", type=int, default=None, help="processes that write shards (default: all)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    g.set_defaults(func=cmd_merge)

    i = sub.add_parser("inspect", help="summarise a shard directory; --verify re-hashes and decodes all")
    i.add_argument("dir", help="shard directory (holds manifest.json), or its URL")
    i.add_argument("--verify", action="store_true",
                   help="re-hash every shard and decode every sample; exit 1 listing each problem")
    i.set_defaults(func=cmd_inspect)


def _report(m: Manifest) -> None:
    for split in m.splits:
        print(f"{split}: {m.num_samples(split)} samples, {m.num_tokens(split)} tokens, "
              f"{len(m.splits[split])} shards")
    blank = {s: v.get("blank_documents", 0) for s, v in (m.raw or {}).get("splits", {}).items()}
    if any(blank.values()):
        print("blank documents skipped (empty or whitespace only): "
              + ", ".join(f"{s} {n}" for s, n in blank.items() if n))
    sft = (m.raw or {}).get("build", {}).get("sft")
    if sft:
        print(f"instruction examples: {sft['skipped']} skipped (no response token within seq_len + 1), "
              f"{sft['truncated']} truncated to seq_len + 1")
    print(f"wrote {m.display_dir}")


def cmd_build(args: argparse.Namespace) -> int:
    m = build_shards(
        args.inputs,
        args.out,
        seq_len=args.seq_len,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        ref_fraction=args.ref_fraction,
        glob=args.glob,
        text_field=args.text_field,
        max_bytes=args.max_bytes,
        max_docs=args.max_docs,
        shard_size_mb=args.shard_size_mb,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        workers=args.workers,
        part=parse_part(args.part) if args.part else None,
        prompt_field=args.prompt_field,
        response_field=args.response_field,
        chat_template=args.chat_template,
        val_input=args.val_input or (),
        ref_input=args.ref_input or (),
    )
    if isinstance(m, Manifest):
        _report(m)
    else:
        print(f"wrote part {args.part} to {m} (join the parts with `attent-scale shards merge`)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    _report(merge_parts(args.parts, args.out, workers=args.workers, overwrite=args.overwrite))
    return 0


def _summary(m: Manifest) -> None:
    print(f"{m.display_dir}: seq_len {m.seq_len}, vocab {m.vocab_size}, eos {m.eos_id}, pad {m.pad_id}, "
          f"tokens {m.token_dtype}, tokenizer {m.tokenizer_kind} {m.tokenizer_source.name} "
          f"({m.tokenizer_sha256[:12]}){', instruction data' if m.sft else ''}")
    raw = m.raw or {}
    for split, shards in m.splits.items():
        n, tokens = m.num_samples(split), m.num_tokens(split)
        print(f"{split}: {n} samples, {tokens} tokens, {len(shards)} shards")
        if not shards:
            continue
        sizes = np.array([s.bytes for s in shards])
        print(f"  shard bytes: min {sizes.min()}, mean {int(sizes.mean())}, max {sizes.max()}, "
              f"total {sizes.sum()}")
        padding = n * (m.seq_len + 1) - tokens
        full = n - (1 if padding else 0)
        if m.sft:
            print(f"  samples: one instruction example each (at most seq_len+1 = {m.seq_len + 1} tokens), "
                  f"{padding} padding tokens")
        else:
            print(f"  window tokens (seq_len+1 = {m.seq_len + 1}): {full} full, {n - full} partial, "
                  f"{padding} padding tokens")
        info = raw.get("splits", {}).get(split, {})
        dt = info.get("doc_tokens")
        if dt:
            skipped = f" (+ {info['blank_documents']} blank, skipped)" if info.get("blank_documents") else ""
            print(f"  documents: {info.get('documents')}{skipped}, text {info.get('text_bytes')} bytes, "
                  f"doc tokens min {dt['min']} p50 {dt['p50']} p90 {dt['p90']} max {dt['max']}")
            hist = dt.get("hist_pow2", [])
            if hist:
                cells = [f"<={2**i}: {c}" for i, c in enumerate(hist) if c]
                print(f"  doc tokens histogram: {', '.join(cells)}")


def verify(m: Manifest) -> list[str]:
    """Re-hash every shard and decode every sample; one line per problem found."""
    bad: list[str] = list(m.count_problems())
    why = file_problem(m.tokenizer_path)
    name = m.tokenizer_source.name  # tokenizer.model, or an HF tokenizer's directory
    if why:
        bad.append(f"{m.tokenizer_path.name}: {why.removeprefix('is ')}")
    else:
        try:
            if tree_sha256(m.tokenizer_source) != m.tokenizer_sha256:
                bad.append(f"{name}: sha256 mismatch")
        except OSError as exc:
            bad.append(f"{name}: unreadable ({exc.strerror or exc})")
    for split, shards in m.splits.items():
        for s in shards:
            where = m.shard_path(s)
            if remote.is_url(where):  # a verified copy in the remote cache: size and sha256 checked there
                try:
                    path = remote.fetch(str(where), s.bytes, s.sha256)
                except remote.Corrupt as exc:
                    bad.append(f"{split}/{s.name}: {str(exc).split(': ', 1)[-1]}")
                    continue
                except remote.Unreachable as exc:
                    bad.append(f"{split}/{s.name}: unreachable ({exc.reason})")
                    continue
            else:
                path = where
                why = file_problem(path)
                if why:
                    bad.append(f"{split}/{s.name}: {why.removeprefix('is ')}")
                    continue
            try:
                bad += _verify_shard(m, split, s, Path(path))
            except OSError as exc:
                bad.append(f"{split}/{s.name}: unreadable ({exc.strerror or exc})")
    return bad


def _verify_shard(m: Manifest, split: str, s: ShardInfo, path: Path) -> list[str]:
    bad = []
    dtype = np.dtype(m.token_dtype)
    if path.stat().st_size != s.bytes:
        bad.append(f"{split}/{s.name}: size {path.stat().st_size} != manifest {s.bytes}")
    if s.sha256 and sha256_file(path) != s.sha256:
        bad.append(f"{split}/{s.name}: sha256 mismatch")
    expected = {sample_key(i) for i in range(s.first_id, s.last_id)}
    seen: set[str] = set()
    try:
        with open(path, "rb") as f:
            for raw in read_samples(f):
                if raw.key not in expected or raw.key in seen:
                    for field in raw.fields:
                        bad.append(f"{split}/{s.name}: unexpected member {raw.key + '.' + field!r}")
                    continue
                seen.add(raw.key)
                sample = decode(raw, dtype, m.seq_len, m.vocab_size)
                if isinstance(sample, str):
                    bad.append(f"{split}/{s.name}: sample {raw.key} does not decode ({sample})")
                elif m.sft and sample.mask is None:
                    bad.append(f"{split}/{s.name}: sample {raw.key} has no {MASK_FIELD} member")
    except OSError:
        raise
    except Exception as exc:  # a truncated/corrupt tar: report, keep checking the rest
        bad.append(f"{split}/{s.name}: unreadable ({type(exc).__name__}: {exc})")
    missing = len(expected - seen)
    if missing:
        bad.append(f"{split}/{s.name}: {missing} sample(s) missing")
    return bad


def cmd_inspect(args: argparse.Namespace) -> int:
    m = Manifest.load(args.dir, check_files=not args.verify)
    _summary(m)
    if not args.verify:
        return 0
    bad = verify(m)
    for line in bad:
        print(f"BAD {line}")
    total = sum(len(v) for v in m.splits.values())
    print(f"verify: {total} shards, {len(bad)} problem(s)")
    return 1 if bad else 0
