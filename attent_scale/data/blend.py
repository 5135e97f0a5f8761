"""Blends: several shard sets (data.sources) seen as one dataset of dense ids, with per-source weights.

Layout of the weighted split (data.train_split): source i gets n_i ids, the sources in the order of
data.sources, so source i holds the ids [O_i, O_i + n_i) with O_i = n_0 + ... + n_(i-1). n_i is the
source's `samples` when given, else its size; with `weight` on every source (relative proportions, like
streaming's `proportion` and Megatron's blend weights), the total T = data.blend_samples (0: the sum of
the sources' sizes) is split by weight, largest remainder first. n_i = K * size + r: K whole copies of
the source (every sample K times, each copy its own ids: the teacher scores and selects copies apart)
and r samples drawn once, stratified over its shards (each shard gives its share of r, largest remainder
first; which samples is a seeded draw of (seed, source, shard)). The layout is a pure function of the
manifests, the sources' settings and the seed: the same on every rank, every epoch and after a resume.
Every other split (val, ref) is each source's split in full, concatenated in source order (weights shape
training, not the held-out measurement).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attent_scale.data.manifest import Manifest, Part, ShardInfo, set_name, shard_location
from attent_scale.errors import UserError

# what every source must share for its samples to mean the same thing to one model
AGREE = ("seq_len", "vocab_size", "eos_id", "pad_id", "token_dtype", "tokenizer_kind", "tokenizer_sha256",
         "sft")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # a Prometheus label value and a JSON key, kept plain
DRAW_TAG = 0xB1E


def _largest_remainder(total: int, shares: list[float]) -> list[int]:
    """Integers summing to `total`, proportional to `shares`; leftovers to the largest remainders, ties to
    the earlier entry."""
    s = float(sum(shares))
    exact = [total * w / s for w in shares]
    out = [int(np.floor(x)) for x in exact]
    rest = total - sum(out)
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:rest]:
        out[i] += 1
    return out


def blend_counts(sizes: list[int], *, weights: list[float | None], samples: list[int | None],
                 total: int = 0) -> list[int]:
    """Ids per source in the weighted split: `samples` where given, else the size, or with weights on
    every source `total` (0: sum of sizes) split by weight (see the module docstring)."""
    given = [w is not None for w in weights]
    if any(given):
        return _largest_remainder(total or sum(sizes), [float(w) for w in weights])  # type: ignore[arg-type]
    return [size if n is None else int(n) for size, n in zip(sizes, samples, strict=True)]


@dataclass(frozen=True)
class Source:
    """One shard set of a blend and its settings (data.sources[i])."""

    name: str
    manifest: Manifest
    weight: float | None = None
    samples: int | None = None
    floor: float = 0.0


class Blend:
    """Several shard sets as one dataset (the Manifest interface the stream, trainer and teacher use)."""

    def __init__(self, sources: list[Source], *, weighted_split: str = "train", total: int = 0,
                 seed: int = 0) -> None:
        if not sources:
            raise UserError("config key 'data.sources': empty")
        self.sources = sources
        self.weighted_split, self.total, self.seed = weighted_split, int(total), int(seed)
        first = sources[0].manifest
        for i, src in enumerate(sources[1:], 1):
            for key in AGREE:
                a, b = getattr(first, key), getattr(src.manifest, key)
                if a != b:
                    raise UserError(f"data.sources[{i}] ({src.name}, {src.manifest.path_shown}): "
                                    f"{key} {b!r} differs from data.sources[0] ({sources[0].name}): {a!r}")
        # the shared description: the first source's (the keys that matter agree)
        for key in ("seq_len", "vocab_size", "eos_id", "pad_id", "token_dtype", "tokenizer_kind",
                    "tokenizer_sha256", "tokenizer_path", "tokenizer_dir", "sft", "newline_symbol"):
            setattr(self, key, getattr(first, key))
        self._parts: dict[str, list[Part]] = {}
        self._ranges: dict[str, list[tuple[str, int, int]]] = {}
        self._fingerprints: dict[str, str] = {}

    # ---- the Manifest interface
    @property
    def tokenizer_source(self) -> Path:
        return self.sources[0].manifest.tokenizer_source

    @property
    def itemsize(self) -> int:
        return self.sources[0].manifest.itemsize

    @property
    def dir(self) -> Path:
        """The first source's directory (for messages that name where the data is)."""
        return self.sources[0].manifest.dir

    def counts(self, split: str) -> list[int]:
        """Ids each source has in `split` (after weights in the weighted split)."""
        sizes = [s.manifest.num_samples(split) for s in self.sources]
        if split != self.weighted_split:
            return sizes
        for i, (src, size) in enumerate(zip(self.sources, sizes, strict=True)):
            if size == 0:
                raise UserError(f"data.sources[{i}] ({src.name}): split {split!r} of {src.manifest.dir} is "
                                "empty")
        return blend_counts(sizes, weights=[s.weight for s in self.sources],
                            samples=[s.samples for s in self.sources], total=self.total)

    def parts(self, split: str) -> list[Part]:
        """Every part of `split` in id order (see the module docstring for the layout)."""
        if split not in self._parts:
            out: list[Part] = []
            base = 0
            for i, (src, n) in enumerate(zip(self.sources, self.counts(split), strict=True)):
                shards = src.manifest.shards(split)
                size = src.manifest.num_samples(split)
                copies, rest = divmod(n, size) if size else (0, 0)
                d = os.fspath(src.manifest.dir)
                for _ in range(copies):
                    for s in shards:
                        out.append(Part(shard_location(d, s.name), base + s.first_id, s.count, s.first_id,
                                        s.count, source=i, bytes=s.bytes, sha256=s.sha256))
                    base += size
                if rest:
                    takes = _largest_remainder(rest, [float(s.count) for s in shards])
                    for j, (s, k) in enumerate(zip(shards, takes, strict=True)):
                        if k:
                            draw = (self.seed, i, j, DRAW_TAG)
                            out.append(Part(shard_location(d, s.name), base, k, s.first_id, s.count,
                                            source=i, draw=draw, bytes=s.bytes, sha256=s.sha256))
                            base += k
            self._parts[split] = out
        return self._parts[split]

    def shards(self, split: str) -> list[ShardInfo]:
        """The parts as shard records (dataset ids; bytes and tokens of a drawn part pro rata)."""
        out = []
        by_first = [{x.first_id: x for x in src.manifest.shards(split)} for src in self.sources]
        for p in self.parts(split):
            s = by_first[p.source][p.local_first]
            frac = p.count / s.count if s.count else 0.0
            out.append(ShardInfo(name=s.name, first_id=p.first_id, count=p.count,
                                 bytes=round(s.bytes * frac), sha256=s.sha256, tokens=round(s.tokens * frac)))
        return out

    def num_samples(self, split: str) -> int:
        return sum(self.counts(split))

    def num_tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.shards(split))

    def fingerprint(self, split: str) -> str:
        """The shard contents and the layout (weights, counts, draws) a stream position is tied to."""
        if split not in self._fingerprints:
            own = [src.manifest.fingerprint(split) for src in self.sources]
            desc = [own, [[p.source, p.location, p.first_id, p.count, p.local_first, p.draw]
                          for p in self.parts(split)]]
            self._fingerprints[split] = hashlib.sha256(json.dumps(desc).encode()).hexdigest()
        return self._fingerprints[split]

    def content_sha256(self) -> str:
        """One hash of every source's manifest.json and the blend settings (what reference scores name)."""
        h = hashlib.sha256()
        for src in self.sources:
            h.update(src.manifest.sha256.encode())  # of its manifest.json's bytes
            h.update(json.dumps([src.name, src.weight, src.samples]).encode())
        h.update(json.dumps([self.weighted_split, self.total, self.seed]).encode())
        return h.hexdigest()

    def source_ranges(self, split: str) -> list[tuple[str, int, int]]:
        """(source name, first id, end id) of each source in `split`."""
        if split not in self._ranges:
            out, base = [], 0
            for src, n in zip(self.sources, self.counts(split), strict=True):
                out.append((src.name, base, base + n))
                base += n
            self._ranges[split] = out
        return self._ranges[split]

    def source_of(self, ids: np.ndarray, split: str) -> np.ndarray:
        """The source index of each dataset id of `split` (the per-id source map)."""
        ends = np.array([hi for _, _, hi in self.source_ranges(split)], dtype=np.int64)
        return np.searchsorted(ends, np.asarray(ids, dtype=np.int64), side="right")

    def manifests(self) -> list[tuple[str, Manifest]]:
        """(name, manifest) of every source."""
        return [(s.name, s.manifest) for s in self.sources]


def open_blend(sources: list[Any], *, weighted_split: str, total: int, seed: int) -> Blend:
    """A Blend from data.sources entries (config.SourceConfig): the one-line UserError names the entry."""
    out: list[Source] = []
    names: set[str] = set()
    weighted = [s.weight is not None for s in sources]
    for i, s in enumerate(sources):
        key = f"data.sources[{i}]"
        if not s.dir:
            raise UserError(f"config key '{key}.dir': required (a directory written by `attent-scale shards "
                            "build`)")
        name = s.name or set_name(s.dir)
        if not NAME_RE.match(name):
            raise UserError(f"config key '{key}.name': {name!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        if name in names:
            raise UserError(f"config key '{key}.name': {name!r} names two sources (give each a name)")
        names.add(name)
        if s.weight is not None and s.samples is not None:
            raise UserError(f"config key '{key}': give weight or samples, not both")
        if any(weighted) and s.weight is None:
            raise UserError(f"config key '{key}.weight': weights are relative, so every source needs one "
                            "(or none: then each gives samples, or is taken whole)")
        if s.weight is not None and not (s.weight > 0 and np.isfinite(s.weight)):
            raise UserError(f"config key '{key}.weight': {s.weight!r} must be a number > 0")
        if s.samples is not None and s.samples < 1:
            raise UserError(f"config key '{key}.samples': {s.samples!r} must be >= 1")
        if not 0.0 <= s.floor <= 1.0:
            raise UserError(f"config key '{key}.floor': {s.floor!r} must be in [0, 1]")
        out.append(Source(name, Manifest.load(s.dir), s.weight, s.samples, s.floor))
    if total and not any(weighted):
        raise UserError("config key 'data.blend_samples': splits the total by data.sources[*].weight; "
                        "give every source a weight (or set samples per source)")
    return Blend(out, weighted_split=weighted_split, total=total, seed=seed)


def open_data(data_cfg: Any, seed: int) -> Manifest | Blend:
    """The dataset a run reads: data.dir (one shard set) or data.sources (a blend), exactly one of them."""
    if data_cfg.sources and data_cfg.dir:
        raise UserError("config keys 'data.dir' and 'data.sources': give one (a blend lists each shard set "
                        "under data.sources)")
    if data_cfg.sources:
        return open_blend(data_cfg.sources, weighted_split=data_cfg.train_split, total=data_cfg.blend_samples,
                          seed=seed)
    if not data_cfg.dir:
        raise UserError("config key 'data.dir': required (a directory written by `attent-scale shards "
                        "build`, or data.sources for a blend)")
    if data_cfg.blend_samples:
        raise UserError("config key 'data.blend_samples': only for a blend (data.sources)")
    return Manifest.load(data_cfg.dir)


def blend_layout_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What a resume must not change in a blend (two config dicts): its ids mean what the sources' order,
    names, weights and sample counts say; their directories may move (like data.dir) and floors change."""
    def layout(cfg: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: (s or {}).get(k) for k in ("name", "weight", "samples")}
                for s in (cfg.get("data") or {}).get("sources") or []]

    a, b = layout(saved), layout(now)
    return [] if a == b else [f"data.sources (name, weight, samples): {a!r} -> {b!r}"]
