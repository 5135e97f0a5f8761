"""`attent-scale score`: per-sample losses of a given model over a split, sharded across ranks, written
keyed by id as safetensors (the reference for `teacher.score: excess`).

The split's ids are cut into global batches of `--batch-size` consecutive ids; rank r scores a contiguous
run of those batches. A batch holds the same rows at any world size, so the file does not depend on the
number of ranks. Ranks run equal numbers of forwards (a rank out of batches scores a filler), which
sharded engines (FSDP, ZeRO-3) need.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from attent_scale.config import add_override_argument, load_config
from attent_scale.data import remote
from attent_scale.data.selection import Selection
from attent_scale.errors import UserError
from attent_scale.teacher.folds import DEFAULT_GROUP, fold_selection
from attent_scale.teacher.reference import LOSS_KEY, VAL_HIST_KEY, read_metadata, scores_metadata

if TYPE_CHECKING:
    from attent_scale.data.samples import Sample

IGNORE_INDEX = -100
SCORES_PREFIX = "scores-"  # default output: MODEL/scores-SPLIT.safetensors (+ .cost.json)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("score", help="per-sample losses of a model over a split (teacher.reference)")
    p.add_argument("--model", required=True,
                   help="model directory: a run's export/ (or export/model), config.json + safetensors")
    p.add_argument("--data", required=True, help="manifest directory (shards build output), or its URL")
    p.add_argument("--split", default="train", help="split to score (the one the learner trains on)")
    p.add_argument("--out", default=None, help="scores file (default: MODEL/scores-SPLIT.safetensors)")
    p.add_argument("--config", default=None, help="run config whose engine.* scores (default: local)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward")
    p.add_argument("--folds", type=int, default=0,
                   help="score only the ids of fold --fold of this many (teacher/folds.py; the rest are NaN)")
    p.add_argument("--fold", type=int, default=0, help="with --folds: the fold scored")
    p.add_argument("--fold-seed", type=int, default=0, help="with --folds: the fold hash's seed")
    p.add_argument("--fold-group", type=int, default=DEFAULT_GROUP,
                   help="with --folds: runs of this many consecutive ids share a fold")
    p.add_argument("--val-hist", action="store_true",
                   help="also score the val split: its loss histogram goes into the file (`val_hist`)")
    add_override_argument(p)
    p.set_defaults(func=_run_cli)


def model_dir(path: str | Path) -> Path:
    """The directory holding config.json + *.safetensors: PATH itself, or PATH/model (PATH/merged) of an
    export; an export of LoRA adapters only is refused (export with model.lora.export_merged)."""
    p = Path(path)
    for d in (p, p / "model", p / "merged", p / "export" / "model", p / "export" / "merged"):
        if (d / "config.json").is_file() and any(d.glob("*.safetensors")):
            return d
    if (p / "adapter").is_dir() or (p / "export" / "adapter").is_dir():
        raise UserError(f"--model {p}: holds LoRA adapters only; score a full model "
                        "(train with model.lora.export_merged: true)")
    raise UserError(f"--model {p}: no config.json with *.safetensors weights (a run's export/ directory?)")


def model_sha256(d: Path) -> str:
    """sha256 over the names and contents of the model directory's config and weights (not the scores
    files this command writes there by default)."""
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors") and not f.name.startswith(SCORES_PREFIX):
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def write_scores(path: Path, loss: np.ndarray, meta: dict[str, str]) -> None:
    """A safetensors file with one float32 tensor and sorted header keys: the same inputs give the same
    bytes (the safetensors library writes its metadata in hash-map order)."""
    write_scores_parts(path, int(np.asarray(loss).shape[0]), [loss], meta)


def write_scores_parts(path: Path, n: int, parts: Iterable[np.ndarray], meta: dict[str, str],
                       extra: dict[str, np.ndarray] | None = None) -> int:
    """write_scores from consecutive slices of the N losses, each written as it comes (the writer holds one
    slice at a time); returns the count of non-finite losses. `extra`: small int64 tensors stored after
    the losses (e.g. `val_hist`). The file appears complete or not at all."""
    nbytes = 4 * int(n)
    header: dict[str, Any] = {"__metadata__": meta,
                              LOSS_KEY: {"dtype": "F32", "shape": [int(n)], "data_offsets": [0, nbytes]}}
    tail = []
    end = nbytes
    for name, arr in sorted((extra or {}).items()):
        arr = np.ascontiguousarray(arr, dtype="<i8")
        header[name] = {"dtype": "I64", "shape": list(arr.shape), "data_offsets": [end, end + arr.nbytes]}
        tail.append(arr.tobytes())
        end += arr.nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    written = bad = 0
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for part in parts:
                part = np.ascontiguousarray(part, dtype="<f4")
                bad += int(np.count_nonzero(~np.isfinite(part)))
                f.write(part.tobytes())
                written += part.nbytes
            if written != nbytes:
                raise RuntimeError(f"score: wrote {written // 4} of {n} losses")
            for chunk in tail:
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return bad


def check_weights(d: Path) -> None:
    """One line naming the file when a weights file of the model directory is truncated or not
    safetensors (the loader would raise a traceback deep inside transformers)."""
    from safetensors import safe_open

    for f in sorted(d.glob("*.safetensors")):
        if f.name.startswith(SCORES_PREFIX):
            continue
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors' own error type, OSError, ...
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UserError(f"--model {f}: unreadable safetensors weights ({first})") from None


def _run_dir_of(d: Path) -> Path | None:
    for cand in (d.parent, d.parent.parent):
        if (cand / "summary.json").is_file():
            return cand
    return None


def _windows(manifest: Any, split: str, lo: int, hi: int) -> Iterator[tuple[int, Sample]]:
    """(id, sample) for ids [lo, hi) of `split`, in id order, reading only the shards that hold them."""
    from attent_scale.data.samples import decode, read_samples

    dtype = np.dtype(manifest.token_dtype)
    expect = lo
    for s in manifest.shards(split):
        if s.last_id <= lo or s.first_id >= hi:
            continue
        path = remote.redact(str(manifest.shard_path(s)))
        try:
            with manifest.open_shard(s) as f:
                for raw in read_samples(f):
                    sid = raw.id
                    if sid is None:
                        raise ValueError(f"bad sample key {raw.key!r}")
                    if sid < expect or sid >= hi:
                        continue
                    if sid != expect:
                        raise UserError(f"{path}: sample {expect} missing (run `shards inspect --verify`)")
                    sample = decode(raw, dtype, manifest.seq_len, manifest.vocab_size)
                    if isinstance(sample, str):
                        raise UserError(f"{path}: sample {sid} does not decode ({sample})")
                    yield sid, sample
                    expect += 1
        except UserError:  # a ValueError too: not an unreadable shard
            raise
        except remote.Unreachable as exc:
            raise UserError(str(exc)) from None
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"{path}: unreadable shard ({type(exc).__name__}: {exc})") from None
    if expect != hi:
        raise UserError(f"{manifest.display_dir}: split {split!r} sample {expect} missing "
                        "(run `shards inspect --verify`)")


def _batches(manifest: Any, split: str, lo: int, hi: int, batch_size: int,
             keep: np.ndarray | None = None) -> Iterator[dict[str, Any]]:
    """Batches of `batch_size` consecutive ids of [lo, hi) (with `keep`, a bool mask over [lo, hi): only
    the ids it holds)."""
    import torch

    t = manifest.seq_len
    rows: list[tuple[int, Sample]] = []

    def pack() -> dict[str, Any]:
        ids = torch.tensor([i for i, _ in rows], dtype=torch.int64)
        inputs = torch.full((len(rows), t), manifest.pad_id, dtype=torch.int64)
        labels = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.int64)
        for r, (_, w) in enumerate(rows):
            k = len(w.tokens) - 1
            inputs[r, :k] = torch.from_numpy(w.inputs.astype(np.int64))
            labels[r, :k] = torch.from_numpy(w.labels)
        return {"ids": ids, "input_ids": inputs, "labels": labels}

    for sid, window in _windows(manifest, split, lo, hi):
        if keep is not None and not keep[sid - lo]:
            continue
        rows.append((sid, window))
        if len(rows) == batch_size:
            yield pack()
            rows = []
    if rows:
        yield pack()


def score_spans(n: int, batch_size: int, world: int) -> tuple[list[tuple[int, int]], int]:
    """The id range [lo, hi) each rank scores (a contiguous, even share of the batches of `batch_size`
    consecutive ids, in rank order) and the forwards every rank runs (the largest share)."""
    n_batches = -(-n // batch_size)
    cuts = [r * n_batches // world for r in range(world + 1)]
    spans = [(min(cuts[r] * batch_size, n), min(cuts[r + 1] * batch_size, n)) for r in range(world)]
    return spans, -(-n_batches // world)


def filtered_spans(keep: Selection, batch_size: int, world: int) -> tuple[list[tuple[int, int]], int]:
    """score_spans over the ids of `keep` only: global batches of `batch_size` consecutive kept ids, rank r
    a contiguous run of them; returns each rank's id range [lo, hi) (the ranges tile [0, N)) and the
    forwards every rank runs. Kept ids are located by counting the bitset's bits in chunks."""
    n_keep = keep.count
    n_batches = -(-n_keep // batch_size)
    cuts = [r * n_batches // world for r in range(world + 1)]
    ordinals = [min(c * batch_size, n_keep) for c in cuts]
    bounds = _ids_at(keep, ordinals[1:-1])
    edges = [0, *bounds, keep.num_ids]
    return [(edges[r], edges[r + 1]) for r in range(world)], -(-n_batches // world)


def _ids_at(keep: Selection, ordinals: list[int]) -> list[int]:
    """The id of the j-th kept id (0-based) for each ascending j; N for j past the last."""
    out: list[int] = []
    seen = 0
    want = iter(ordinals)
    j = next(want, None)
    for ids in keep.iter_ids():
        while j is not None and j < seen + ids.shape[0]:
            out.append(int(ids[j - seen]))
            j = next(want, None)
        seen += ids.shape[0]
    while j is not None:
        out.append(keep.num_ids)
        j = next(want, None)
    return out


def score_rank(engine: Any, manifest: Any, split: str, batch_size: int, rank: int, world: int,
               keep: Selection | None = None) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Collective (every rank runs the same number of forwards): this rank's share of the split's ids
    (`keep`: only those ids) scored by `engine`. Returns every rank's id range and this rank's losses over
    its range (NaN for ids outside `keep`). A batch holds the same rows at any world size, so the losses do
    not depend on the number of ranks."""
    import torch

    n = manifest.num_samples(split)
    if keep is None:
        spans, most = score_spans(n, batch_size, world)
    else:
        spans, most = filtered_spans(keep, batch_size, world)
    lo, hi = spans[rank]
    mask = None
    if keep is not None:
        mask = np.unpackbits(keep.slice_bits(lo, hi), count=hi - lo, bitorder="little").astype(bool)
    filler = {"ids": torch.full((1,), -1, dtype=torch.int64),
              "input_ids": torch.full((1, manifest.seq_len), manifest.pad_id, dtype=torch.int64),
              "labels": torch.full((1, manifest.seq_len), IGNORE_INDEX, dtype=torch.int64)}
    losses = np.full(hi - lo, np.nan, dtype=np.float32)
    it = _batches(manifest, split, lo, hi, batch_size, mask)
    for _ in range(most):
        batch = next(it, None)
        scores = engine.score(batch if batch is not None else filler)
        if batch is not None:
            losses[batch["ids"].numpy() - lo] = scores.numpy()
    if next(it, None) is not None:
        raise RuntimeError("score: more batches than planned")
    return spans, losses


def write_from_ranks(out: Path, n: int, spans: list[tuple[int, int]], losses: np.ndarray,
                     meta: dict[str, str], rank: int, world: int, group: Any,
                     extra: dict[str, np.ndarray] | None = None) -> int:
    """Collective: rank 0 writes the N losses, receiving one rank's block at a time (nobody holds all N);
    returns the count of non-finite losses written (NaN for ids not scored included; 0 off rank 0)."""
    import torch
    import torch.distributed as dist

    def blocks() -> Iterator[np.ndarray]:
        yield losses
        for r in range(1, world):
            got = torch.empty(spans[r][1] - spans[r][0], dtype=torch.float32)
            if got.numel():
                dist.recv(got, src=r, group=group)
            yield got.numpy()

    bad = 0
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        bad = write_scores_parts(out, n, blocks(), meta, extra)
    elif losses.shape[0]:
        dist.send(torch.from_numpy(losses), dst=0, group=group)
    return bad


def val_histogram(engine: Any, manifest: Any, batch_size: int, rank: int, world: int, group: Any
                  ) -> np.ndarray:
    """Collective: the histogram (teacher.signals bins, int64) of the model's per-sample losses over the
    whole val split, summed over ranks: the same counts at any world size."""
    import torch
    import torch.distributed as dist

    from attent_scale.teacher.signals import histogram

    _, losses = score_rank(engine, manifest, "val", batch_size, rank, world)
    hist = torch.from_numpy(histogram(losses))
    if world > 1:
        dist.all_reduce(hist, group=group)
    return hist.numpy()


def score_split(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from attent_scale.data import Manifest
    from attent_scale.dist import init_distributed, side_group
    from attent_scale.engines import build_engine

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.folds and not 0 <= args.fold < args.folds:
        raise UserError(f"--fold {args.fold}: outside [0, --folds {args.folds})")
    mdir = model_dir(args.model)
    check_weights(mdir)
    cfg = load_config(args.config, args.overrides)
    remote.configure(remote.from_config(cfg.data))  # data.cache_dir, retries... for a --data URL
    manifest = Manifest.load(args.data)
    n = manifest.num_samples(args.split)
    out = Path(args.out) if args.out else mdir / f"{SCORES_PREFIX}{args.split}.safetensors"
    meta = scores_metadata(manifest, args.split, model_sha256(mdir))
    if args.folds:
        meta.update(folds=str(args.folds), fold=str(args.fold), fold_seed=str(args.fold_seed),
                    fold_group=str(args.fold_group))
    if args.val_hist:
        meta["val_hist"] = "1"

    info = init_distributed()
    rank, world = info.rank, info.world_size
    group = side_group()
    fresh = torch.tensor([1 if read_metadata(out) == meta else 0], dtype=torch.int64)
    if world > 1:  # rank 0 decides: every rank skips or every rank scores
        dist.broadcast(fresh, 0, group=group)
    if int(fresh.item()):
        if rank == 0:
            print(f"score: {out} is up to date (same manifest, split and model); nothing to do")
        return 0

    cfg.model.init_from, cfg.model.pretrained = str(mdir), None
    cfg.model.config = {}
    cfg.model.lora.enabled = False
    engine = build_engine(cfg, manifest)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    keep = None
    if args.folds:
        keep = fold_selection(n, args.folds, args.fold, args.fold_seed, train_on="fold",
                              group=args.fold_group)
    spans, losses = score_rank(engine, manifest, args.split, args.batch_size, rank, world, keep)
    extra = None
    if args.val_hist:
        extra = {VAL_HIST_KEY: val_histogram(engine, manifest, args.batch_size, rank, world, group)[None, :]}
    bad = write_from_ranks(out, n, spans, losses, meta, rank, world, group, extra)
    if rank == 0:
        skipped = n - keep.count if keep is not None else 0
        if bad > skipped:
            print(f"score: warning: {bad - skipped} non-finite loss(es) in {out}", file=sys.stderr)
        cost = {"score_seconds": time.perf_counter() - t_wall,
                "score_cpu_seconds": time.process_time() - t_cpu,
                "world_size": world, "engine": cfg.engine.name, "model": str(mdir)}
        run = _run_dir_of(mdir)
        if run is not None:  # the reference model's own training is part of its one-time cost
            s = json.loads((run / "summary.json").read_text())
            cost.update(run_dir=str(run), train_seconds=s.get("train_seconds", 0.0),
                        train_cpu_seconds=s.get("train_cpu_seconds", 0.0),
                        eval_seconds=s.get("eval_seconds", 0.0))
        Path(f"{out}.cost.json").write_text(json.dumps(cost, indent=1) + "\n")
        what = f"{n} samples" if keep is None else f"{n - skipped} samples (fold {args.fold} of {args.folds})"
        print(f"score: {what} of split {args.split!r} in {cost['score_seconds']:.1f}s on {world} "
              f"rank(s); wrote {out}")
    if world > 1:
        dist.barrier(group=group)
    return 0


def _run_cli(args: argparse.Namespace) -> int:
    return score_split(args)
