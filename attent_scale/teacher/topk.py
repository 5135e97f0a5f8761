"""Distributed exact top-k over (key, id) pairs held by all ranks: `gather` and `threshold` methods."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attent_scale.teacher.comm import Comm, resolve_group

METHODS = ("gather", "threshold")
RADIX_BITS = 12  # histogram bins per round = 2**RADIX_BITS (32 KiB of int64 counts)
_SIGN = np.uint64(1 << 63)


class SelectionMismatchError(RuntimeError):
    """Ranks computed different selections (the hashes of their selected ids differ)."""


# ----------------------------------------------------------------------------- helpers


def key_image(keys: np.ndarray) -> np.ndarray:
    """Order-preserving uint64 image of float64 keys: a < b  <=>  image(a) < image(b); -0.0 == +0.0;
    every NaN maps to 0, below every other key (also below -inf). Computed in cache-sized chunks."""
    k = np.ascontiguousarray(keys, dtype=np.float64).reshape(-1)
    out = np.empty(k.shape[0], dtype=np.uint64)
    step = 1 << 18
    for i in range(0, k.shape[0], step):
        x = k[i:i + step] + 0.0  # -0.0 -> +0.0
        xb = x.view(np.int64)
        m = np.right_shift(xb, 63).view(np.uint64)  # all ones for negative keys
        m |= _SIGN
        u = out[i:i + step]
        np.bitwise_xor(x.view(np.uint64), m, out=u)
        u[np.isnan(x)] = 0
    return out


def _np(x: torch.Tensor | np.ndarray, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype).reshape(-1)


def ids_hash(ids: np.ndarray) -> int:
    """64-bit hash (blake2b) of a sorted int64 id array, as little-endian bytes."""
    data = np.ascontiguousarray(ids, dtype="<i8").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def bitset_hash(bits: np.ndarray) -> int:
    """64-bit hash (blake2b) of a packed selection bitset."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(bits).tobytes(), digest_size=8).digest(),
                          "little")


def sorted_ids(chosen: np.ndarray) -> np.ndarray:
    """Sort unique int64 ids; a bitmap pass when they are dense enough, else a sort."""
    chosen = np.asarray(chosen, dtype=np.int64)
    if chosen.size == 0:
        return chosen.copy()
    hi = int(chosen.max())
    if int(chosen.min()) >= 0 and hi < 16 * chosen.size:
        m = np.zeros(hi + 1, dtype=bool)
        m[chosen] = True
        return np.flatnonzero(m).astype(np.int64)
    return np.sort(chosen)


def local_topk(u: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Single-process exact top-k: largest image first, ties to the smaller id; returns sorted ids."""
    n = u.shape[0]
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k >= n:
        return sorted_ids(ids)
    t = np.partition(u, n - k)[n - k]  # the k-th largest image
    above = u > t
    need = k - int(np.count_nonzero(above))
    tie_ids = ids[u == t]
    if need < tie_ids.shape[0]:
        tie_ids = np.partition(tie_ids, need - 1)[:need] if need > 0 else tie_ids[:0]
    return sorted_ids(np.concatenate([ids[above], tie_ids]))


U64Source = Callable[[], Iterator[np.ndarray]]  # re-iterable chunks of uint64 values
COLLECT_CAP = 1 << 24  # a descent keeps its candidates in memory once at most this many remain


def _kth(u: np.ndarray | U64Source, k: int, comm: Comm | None, *, bits: int = 64,
         phase: str = "collective", radix: int = RADIX_BITS) -> tuple[int, int, int, int]:
    """kth_largest plus this rank's count of values equal to the k-th. `u` is an array or a callable that
    yields the values again in chunks on every call; with a callable, each round re-reads the chunks,
    filtered by the prefix found so far, until few enough candidates remain to keep them."""
    cand = u if isinstance(u, np.ndarray) else None
    prefix = 0
    need = int(k)
    shift = int(bits)
    done = 0
    eq = local_eq = 0
    chunk = 1 << 18
    while shift > 0:
        b = min(radix, shift)
        shift -= b
        sh, mask = np.uint64(shift), np.uint64((1 << b) - 1)
        h = np.zeros(1 << b, dtype=np.int64)
        keep: list[np.ndarray] | None = None
        if cand is not None:
            chunks: Any = (cand[i:i + chunk] for i in range(0, cand.shape[0], chunk))
        else:
            keep, kept = [], 0
            top, want = np.uint64(shift + b), np.uint64(prefix)
            chunks = (c if done == 0 else c[(c >> top) == want] for c in u())  # type: ignore[operator]
        for c in chunks:  # chunked: no large temporaries
            h += np.bincount(((c >> sh) & mask).view(np.int64), minlength=1 << b)  # < 2**b: a view
            if keep is not None:
                kept += c.shape[0]
                if kept <= COLLECT_CAP:
                    keep.append(c.copy())
                else:
                    keep = None
        local = h.copy()
        hist = torch.from_numpy(h)
        if comm is not None:
            comm.all_reduce(hist, phase)
        h = hist.numpy()
        above = np.cumsum(h[::-1])[::-1] - h  # count in strictly higher bins
        d = int(np.flatnonzero((above < need) & (above + h >= need))[0])
        need -= int(above[d])
        eq, local_eq = int(h[d]), int(local[d])
        prefix = (prefix << b) | d
        done += b
        dd = np.uint64(d)
        if keep is not None:
            cand = np.concatenate(keep) if keep else np.zeros(0, dtype=np.uint64)
        if cand is not None:
            cand = np.concatenate([c[((c >> sh) & mask) == dd] for c in
                                   (cand[i:i + chunk] for i in range(0, cand.shape[0], chunk))]
                                  or [cand[:0]])
    return prefix, int(k) - need, eq, local_eq


def kth_largest(u: np.ndarray | U64Source, k: int, comm: Comm | None, *, bits: int = 64,
                phase: str = "collective") -> tuple[int, int, int]:
    """Exact k-th largest (1 <= k <= global count) of uint64 values < 2**bits spread over ranks, by
    histogram all-reduce rounds of RADIX_BITS bits from the top. `u`: an array, or a callable yielding the
    values in chunks (re-read every round while many candidates remain). Returns (value, count strictly
    above, count equal), all global and identical on every rank."""
    value, n_above, n_eq, _ = _kth(u, k, comm, bits=bits, phase=phase)
    return value, n_above, n_eq


# ----------------------------------------------------------------------------- the public entry


def check_agreement(ids: np.ndarray, comm: Comm | None, phase: str = "share", *,
                    digest: int | None = None) -> int:
    """All-gather a hash of the selected ids (or the given `digest` of the same set); raise
    SelectionMismatchError naming both hashes if any rank differs. Returns the hash."""
    h = ids_hash(ids) if digest is None else int(digest)
    if comm is None:
        return h
    mine = torch.tensor([np.uint64(h).view(np.int64)], dtype=torch.int64)
    hs = torch.cat(comm.all_gather(mine, phase)).numpy().view(np.uint64)
    bad = np.flatnonzero(hs != hs[0])
    if bad.size:
        r = int(bad[0])
        raise SelectionMismatchError(
            f"selection differs across ranks: rank 0 hash {int(hs[0]):016x} != rank {r} hash "
            f"{int(hs[r]):016x} (this is rank {comm.rank})"
        )
    return h


def select_global(
    keys: torch.Tensor | np.ndarray,
    ids: torch.Tensor | np.ndarray,
    k: int,
    *,
    method: str = "gather",
    group: Any = None,
    report: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Exact global top-k: every rank passes its local keys (float64) and ids (int64, >= 0, unique across
    ranks; possibly empty); every rank gets the same sorted int64 tensor of the min(k, N) ids ranked
    highest (largest key first, ties to the smaller id, NaN keys after every other key). Without an
    initialised process group this is the single-process reference. `report`, when given, is filled
    with bytes sent by this rank (ring model) and seconds per phase."""
    if method not in METHODS:
        raise ValueError(f"unknown top-k method {method!r} (one of {', '.join(METHODS)})")
    t_start = time.perf_counter()
    key_np = _np(keys, np.float64)
    id_np = _np(ids, np.int64)
    bad = int(key_np.shape[0] != id_np.shape[0] or (id_np.size > 0 and int(id_np.min()) < 0) or k < 0)
    pg = resolve_group(group)
    comm = Comm(pg) if pg is not None else None
    n_local = int(id_np.shape[0])
    lo = int(id_np.min()) if n_local and not bad else -1
    hi = int(id_np.max()) if n_local and not bad else -1
    ctrl = torch.tensor([[n_local, lo, hi, bad]], dtype=torch.int64)
    rows = torch.cat(comm.all_gather(ctrl, "control")).numpy() if comm else ctrl.numpy()
    if rows[:, 3].any():
        raise ValueError("select_global: keys/ids length mismatch, negative id or k < 0 on some rank "
                         f"(ranks {np.flatnonzero(rows[:, 3]).tolist()})")
    total = int(rows[:, 0].sum())
    max_id = int(rows[:, 2].max())
    k_eff = max(0, min(int(k), total))
    sel_s = 0.0
    t0 = time.perf_counter()
    u = key_image(key_np)
    sel_s += time.perf_counter() - t0
    rounds = 0
    share_s = 0.0
    digest: int | None = None
    if comm is None:
        t0 = time.perf_counter()
        result = local_topk(u, id_np, k_eff)
        sel_s += time.perf_counter() - t0
    elif method == "gather":
        m = int(rows[:, 0].max())
        buf = torch.zeros((2, m), dtype=torch.int64)
        buf[0, :n_local] = torch.from_numpy(u.view(np.int64))
        buf[1, :n_local] = torch.from_numpy(id_np)
        parts = comm.all_gather(buf, "collective")
        t0 = time.perf_counter()
        allu = np.concatenate([p[0, : rows[r, 0]].numpy() for r, p in enumerate(parts)]).view(np.uint64)
        alli = np.concatenate([p[1, : rows[r, 0]].numpy() for r, p in enumerate(parts)])
        del parts
        result = local_topk(allu, alli, k_eff)
        sel_s += time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        if k_eff == 0:
            chosen = id_np[:0]
        elif k_eff == total:
            chosen = id_np
        else:
            coll0 = comm.seconds.get("collective", 0.0)
            t_val, n_above, n_eq = kth_largest(u, k_eff, comm)
            rounds = (64 + RADIX_BITS - 1) // RADIX_BITS
            need = k_eff - n_above
            t_val_u = np.uint64(t_val)
            tie_ids = id_np[u == t_val_u]
            take = id_np[u > t_val_u]
            if need >= n_eq:
                chosen = np.concatenate([take, tie_ids])
            else:
                tie_ids = np.sort(tie_ids)
                nz = rows[rows[:, 0] > 0]
                ordered = bool(np.all(nz[1:, 1] > nz[:-1, 2])) if nz.shape[0] > 1 else True
                if ordered:  # rank order == id order: exclusive scan of tie counts
                    cnt = torch.tensor([[tie_ids.shape[0]]], dtype=torch.int64)
                    counts = torch.cat(comm.all_gather(cnt, "collective")).numpy().reshape(-1)
                    offset = int(counts[: comm.rank].sum())
                    mine = max(0, min(tie_ids.shape[0], need - offset))
                    chosen = np.concatenate([take, tie_ids[:mine]])
                else:  # radix descent on the tied ids: the need-th smallest tied id
                    id_bits = max(1, max_id.bit_length())
                    flip = np.uint64((1 << id_bits) - 1) - tie_ids.view(np.uint64)
                    t_id, _, _ = kth_largest(flip, need, comm, bits=id_bits)
                    rounds += (id_bits + RADIX_BITS - 1) // RADIX_BITS
                    chosen = np.concatenate([take, tie_ids[flip >= np.uint64(t_id)]])
            sel_s -= comm.seconds.get("collective", 0.0) - coll0
        sel_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        nbits = max_id + 1 if max_id >= 0 else 0
        bits = np.zeros((nbits + 7) // 8, dtype=np.uint8)
        if chosen.shape[0]:  # pack only this rank's id range, byte-aligned
            lo8 = int(chosen.min()) // 8 * 8
            mask = np.zeros(int(chosen.max()) - lo8 + 1, dtype=bool)
            mask[chosen - lo8] = True
            packed = np.packbits(mask, bitorder="little")
            bits[lo8 // 8: lo8 // 8 + packed.shape[0]] = packed
            del mask, packed
        bitset = torch.from_numpy(bits)
        if nbits:
            comm.all_reduce(bitset, "share", op=dist.ReduceOp.BOR)
        result = np.flatnonzero(
            np.unpackbits(bitset.numpy(), count=nbits, bitorder="little")
        ).astype(np.int64)
        if result.shape[0] != k_eff:  # same bitset everywhere, so every rank raises together
            raise SelectionMismatchError(
                f"threshold selection has {result.shape[0]} ids, expected {k_eff}: ranks disagreed"
            )
        digest = bitset_hash(bitset.numpy())
        share_s += time.perf_counter() - t1
    t2 = time.perf_counter()
    check_agreement(result, comm, digest=digest)
    share_s += time.perf_counter() - t2
    if report is not None:
        by = dict(comm.bytes) if comm else {}
        secs = dict(comm.seconds) if comm else {}
        report.clear()
        report.update(
            method=method if comm else "local",
            world_size=comm.world if comm else 1,
            n=total,
            k=int(result.shape[0]),
            rounds=rounds,
            bytes_sent=by,
            bytes_total=int(sum(by.values())),
            seconds={
                "collective": secs.get("collective", 0.0) + secs.get("control", 0.0),
                "select": sel_s,
                "share": share_s,
                "total": time.perf_counter() - t_start,
            },
        )
    return torch.from_numpy(result)


BLOCK_RADIX = 16  # histogram bits per round in select_block_bits (65536 bins, 512 KiB all-reduced)


def select_block_bits(
    image_chunks: U64Source,
    lo: int,
    hi: int,
    num_ids: int,
    k: int,
    *,
    bits: int = 64,
    group: Any = None,
    report: dict[str, Any] | None = None,
) -> np.ndarray:
    """Exact global top-k for the layout the teacher uses: rank r holds the keys of the id block [lo, hi)
    of ledger.block_range (8-aligned, ascending with the rank), produced on demand by `image_chunks()` as
    order-preserving uint64 images (< 2**bits; e.g. key_image of float64 keys) for consecutive ids from lo
    (each chunk a multiple of 8 long but the last). Returns the same packed bitset (ceil(num_ids / 8)
    bytes, little bit order) on every rank: the k largest images, ties to the smaller id, as
    select_global(keys, ids, k, method="threshold") chooses. Memory: a few chunks plus the bitset; images
    are recomputed per histogram round instead of being held."""
    t_start = time.perf_counter()
    pg = resolve_group(group)
    comm = Comm(pg) if pg is not None else None
    world = comm.world if comm else 1
    n_local = hi - lo
    nbytes = (num_ids + 7) // 8
    per = -(-nbytes // world)  # every rank's bitset slice has the same size: one all_gather
    if n_local < 0 or (n_local > 0 and (lo % 8 or (comm is not None and lo != 8 * per * comm.rank))):
        raise ValueError(f"select_block_bits: block [{lo}, {hi}) is not this rank's 8-aligned block")
    ctrl = torch.tensor([n_local], dtype=torch.int64)
    if comm is not None:
        comm.all_reduce(ctrl, "control")
    total = int(ctrl.item())
    k_eff = max(0, min(int(k), total))

    images = image_chunks
    sel_s = 0.0
    rounds = 0
    t0 = time.perf_counter()
    coll0 = comm.seconds.get("collective", 0.0) if comm else 0.0
    if 0 < k_eff < total:
        t_val, n_above, n_eq, my_eq = _kth(images, k_eff, comm, bits=bits, radix=BLOCK_RADIX)
        rounds = (bits + BLOCK_RADIX - 1) // BLOCK_RADIX
        need = k_eff - n_above
        if need >= n_eq:
            quota = my_eq
        else:  # ties go to the smaller ids: an exclusive scan of tie counts in rank (= id) order
            counts = torch.tensor([my_eq], dtype=torch.int64)
            if comm is not None:
                counts = torch.cat(comm.all_gather(counts, "collective"))
            offset = int(counts[: comm.rank if comm else 0].sum())
            quota = max(0, min(my_eq, need - offset))
    else:
        t_val, quota = (0, n_local) if k_eff == total else (1 << 64, 0)
    out = torch.zeros(world * per, dtype=torch.uint8)
    mine = out[(comm.rank if comm else 0) * per:][:per].numpy()
    pos = 0
    t_img = np.uint64(min(t_val, (1 << 64) - 1))
    for u in images():
        if k_eff == 0:
            break
        chosen = u > t_img if t_val < (1 << 64) else np.zeros(u.shape[0], dtype=bool)
        if quota:
            ties = np.flatnonzero(u == t_img)[:quota]
            chosen[ties] = True
            quota -= ties.shape[0]
        packed = np.packbits(chosen, bitorder="little")
        mine[pos // 8:pos // 8 + packed.shape[0]] = packed
        pos += u.shape[0]
    if pos not in (0, n_local) and k_eff:
        raise ValueError(f"select_block_bits: key chunks covered {pos} of {n_local} ids")
    sel_s += time.perf_counter() - t0 - ((comm.seconds.get("collective", 0.0) - coll0) if comm else 0.0)
    t1 = time.perf_counter()
    if comm is not None:
        send = torch.from_numpy(mine.copy())
        comm.all_gather_into(out, send, "share")
        del send
    bits = out.numpy()[:nbytes]
    got = sum(int(np.bitwise_count(bits[i:i + (1 << 22)]).sum(dtype=np.int64))
              for i in range(0, nbytes, 1 << 22))
    if got != k_eff:  # same bitset everywhere, so every rank raises together
        raise SelectionMismatchError(f"threshold selection has {got} ids, expected {k_eff}: ranks disagreed")
    check_agreement(np.zeros(0, dtype=np.int64), comm, digest=bitset_hash(bits))
    share_s = time.perf_counter() - t1
    if report is not None:
        by = dict(comm.bytes) if comm else {}
        secs = dict(comm.seconds) if comm else {}
        report.clear()
        report.update(
            method="threshold" if comm else "local", world_size=world, n=total, k=got, rounds=rounds,
            bytes_sent=by, bytes_total=int(sum(by.values())),
            seconds={"collective": secs.get("collective", 0.0) + secs.get("control", 0.0), "select": sel_s,
                     "share": share_s, "total": time.perf_counter() - t_start},
        )
    return bits
