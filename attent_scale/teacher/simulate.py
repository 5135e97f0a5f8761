"""Single-process simulation of the distributed teacher: W ranks as threads over a fake process group."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

SIM_TIMEOUT_S = 600.0  # a collective that waits this long means the ranks diverged (a real job would hang)


class SimulationError(RuntimeError):
    """Simulated ranks called different collectives, or one waited too long for the others."""


class SimGroup:
    """A fake process group for `world` threads: the collectives teacher/comm.py's Comm uses
    (all_gather, all_reduce with SUM / MAX / BOR, all_to_all_single), with the same signatures as
    comm.TorchOps, so the teacher runs its gloo code path unchanged. Each thread is bound to a rank with
    `bind(rank)` (run_ranks does that). A collective stores every rank's input, lets the last rank to
    arrive combine them once, and hands each rank its part; a second barrier keeps the inputs alive until
    every rank has read. Every rank must call the same collectives in the same order, as with gloo: a
    mismatch raises SimulationError instead of hanging."""

    simulated = True
    ReduceOp = dist.ReduceOp

    def __init__(self, world: int, *, timeout: float = SIM_TIMEOUT_S) -> None:
        if world < 1:
            raise ValueError(f"world size must be >= 1, got {world}")
        self.world = int(world)
        self.timeout = float(timeout)
        self._local = threading.local()
        self._slots: list[Any] = [None] * self.world
        self._result: Any = None
        self._error: str | None = None
        self._arrive = threading.Barrier(self.world, action=self._combine, timeout=self.timeout)
        self._leave = threading.Barrier(self.world, timeout=self.timeout)

    # ---------------------------------------------------------------- ranks

    def bind(self, rank: int) -> None:
        """Make the calling thread rank `rank`."""
        self._local.rank = int(rank)

    def abort(self) -> None:
        """Break the barriers: every rank waiting in a collective gets an error (used when one rank fails)."""
        self._arrive.abort()
        self._leave.abort()

    def get_world_size(self, group: Any = None) -> int:
        return self.world

    def get_rank(self, group: Any = None) -> int:
        rank = getattr(self._local, "rank", None)
        if rank is None:
            raise SimulationError("this thread is not a simulated rank (SimGroup.bind)")
        return rank

    # ---------------------------------------------------------------- the collectives

    def _collective(self, kind: str, payload: Any, take: Callable[[Any], None]) -> None:
        """Store this rank's input, wait for all, then `take(combined)` before any rank may go on."""
        rank = self.get_rank()
        self._slots[rank] = (kind, payload)
        try:
            self._arrive.wait()
            if self._error is not None:
                raise SimulationError(self._error)
            take(self._result)
        except threading.BrokenBarrierError:
            raise SimulationError(f"rank {rank}: {kind} broken off (a rank failed or diverged)") from None
        finally:
            with contextlib.suppress(threading.BrokenBarrierError):
                self._leave.wait()

    def _combine(self) -> None:
        """Runs once per collective, in the last thread to arrive."""
        kinds = {s[0] for s in self._slots}
        self._error = None
        self._result = None
        if len(kinds) != 1:
            self._error = f"ranks called different collectives: {sorted(kinds)}"
            return
        kind = kinds.pop()
        items = [s[1] for s in self._slots]
        if kind == "all_gather":
            parts = [x.numpy().reshape(-1) for x in items]
            flat = np.concatenate(parts)  # a copy: the inputs may change once the ranks go on
            self._result = (np.split(flat, np.cumsum([p.shape[0] for p in parts])[:-1]), flat)
        elif kind.startswith("all_reduce"):
            op = kind.split(":", 1)[1]
            acc = np.array(items[0].numpy(), copy=True)
            fn = {"SUM": np.add, "MAX": np.maximum, "MIN": np.minimum, "BOR": np.bitwise_or}.get(op)
            if fn is None:
                self._error = f"reduce op {op} is not simulated"
                return
            for x in items[1:]:
                fn(acc, x.numpy(), out=acc)
            self._result = acc
        elif kind == "all_to_all":
            sources = []
            for arr, splits in items:
                offsets = np.concatenate([[0], np.cumsum(splits)]).astype(np.int64)
                sources.append((arr, offsets))
            self._result = sources
        else:
            self._error = f"unknown collective {kind}"

    def all_gather(self, out: list[torch.Tensor], t: torch.Tensor, group: Any = None) -> None:
        base = out[0]._base if out else None
        flat = (base is not None and base.is_contiguous() and base.numel() == sum(o.numel() for o in out)
                and out[0].data_ptr() == base.data_ptr())

        def take(result: tuple[list[np.ndarray], np.ndarray]) -> None:
            parts, whole = result
            if flat:  # views of one buffer (Comm's all_gather and all_gather_into): one copy
                base.view(-1).copy_(torch.from_numpy(whole))
            else:
                for o, p in zip(out, parts, strict=True):
                    o.copy_(torch.from_numpy(p).view(o.shape))

        self._collective("all_gather", t.detach().contiguous(), take)

    def all_reduce(self, t: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None) -> None:
        name = next((n for n in ("SUM", "MAX", "MIN", "BOR") if op == getattr(dist.ReduceOp, n)), str(op))
        src = t.detach().contiguous()
        self._collective(f"all_reduce:{name}", src, lambda acc: t.copy_(torch.from_numpy(acc).view(t.shape)))

    def all_to_all_single(self, out: torch.Tensor, t: torch.Tensor, out_splits: list[int] | None,
                          in_splits: list[int] | None, group: Any = None) -> None:
        rank = self.get_rank()
        arr = t.detach().contiguous().numpy()
        if in_splits is None:
            in_splits = [arr.shape[0] // self.world] * self.world
        def take(sources: list[tuple[np.ndarray, np.ndarray]]) -> None:
            recv = np.concatenate([a[off[rank]:off[rank + 1]] for a, off in sources])
            if recv.shape[0] != out.shape[0]:
                raise SimulationError(f"rank {rank}: all_to_all received {recv.shape[0]} rows, "
                                      f"expected {out.shape[0]}")
            out.copy_(torch.from_numpy(recv).view(out.shape))

        self._collective("all_to_all", (arr, list(in_splits)), take)

    def barrier(self, group: Any = None) -> None:
        t = torch.zeros(1, dtype=torch.int64)
        self.all_reduce(t)


def run_ranks(world: int, fn: Callable[[int, SimGroup], Any], *,
              timeout: float = SIM_TIMEOUT_S) -> list[Any]:
    """Run fn(rank, group) for every rank of a SimGroup of `world` threads; returns the results by rank.
    If a rank raises, the others are released and the first error (by rank) is raised again."""
    group = SimGroup(world, timeout=timeout)
    results: list[Any] = [None] * world
    errors: list[BaseException | None] = [None] * world

    def body(rank: int) -> None:
        group.bind(rank)
        try:
            results[rank] = fn(rank, group)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
            errors[rank] = exc
            group.abort()

    old = threading.stack_size()
    threading.stack_size(1 << 20 if world > 64 else 0)  # 1,024 threads: 1 MiB stacks are plenty
    try:
        threads = [threading.Thread(target=body, args=(r,), name=f"sim-rank-{r}") for r in range(world)]
    finally:
        threading.stack_size(old)
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    first = next((e for e in errors if e is not None and not isinstance(e, SimulationError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


# ------------------------------------------------------------------------- a selection to measure


def synthetic_losses(n: int, seed: int = 0, *, unseen: float = 0.05, nonfinite: float = 0.01,
                     ties: float = 0.1) -> np.ndarray:
    """Float32 losses for ids [0, n): lognormal, with a fraction of ties (one value), NaN and never
    observed ids (-1 marks those; they are not passed to the ledger)."""
    rng = np.random.default_rng(seed)
    loss = rng.lognormal(0.5, 0.6, n).astype(np.float32)
    loss[rng.random(n) < ties] = np.float32(1.5)
    loss[rng.random(n) < nonfinite] = np.nan
    loss[rng.random(n) < unseen] = -1.0
    return loss


def observer_of(n: int, world: int, seed: int = 0) -> np.ndarray:
    """Which rank observed each id: a random rank, so most observations belong to another rank's block."""
    return np.random.default_rng(seed + 1).integers(0, world, n) if world > 1 else np.zeros(n, np.int64)


def simulate_selection(num_samples: int, world: int, *, strategy: str = "hard", method: str = "threshold",
                       ratio: float = 0.5, prune_quantile: float = 0.5, losses: np.ndarray | None = None,
                       reference: Any = None, seed: int = 0, extra: dict[str, Any] | None = None,
                       ranks: Sequence[int] | None = None) -> dict[str, Any]:
    """One ledger-mode selection of `num_samples` ids on `world` simulated ranks (Teacher.select, the
    gloo code path): every rank observes the losses of the ids `observer_of` gives it, then all select.
    Returns {"bits": the selection bitset (checked identical on every rank), "selections": per-rank
    Selection, "records": per-rank selection records, "wall_s": wall seconds of the select calls}."""
    from attent_scale.config import TeacherConfig
    from attent_scale.teacher.teacher import Teacher

    loss = synthetic_losses(num_samples, seed) if losses is None else np.asarray(losses, dtype=np.float32)
    who = observer_of(num_samples, world, seed)
    seen = ~(loss == -1.0)
    cfg = TeacherConfig(mode="ledger", strategy=strategy, topk_method=method, warmup_epochs=1,
                        ratio_schedule="constant", initial_ratio=ratio, final_ratio=ratio,
                        prune_quantile=prune_quantile, **(extra or {}))
    walls: list[float] = [0.0] * world

    def rank_fn(rank: int, group: SimGroup) -> tuple[Any, dict[str, Any]]:
        t = Teacher(cfg, num_samples=num_samples, seed=seed, group=group, reference=reference)
        mine = np.flatnonzero((who == rank) & seen).astype(np.int64)
        t.observe(torch.from_numpy(mine), torch.from_numpy(loss[mine]), step=0)
        t0 = time.perf_counter()
        sel = t.select(1, step=1)
        walls[rank] = time.perf_counter() - t0
        return sel, t.last_record

    out = run_ranks(world, rank_fn)
    sels = [s for s, _ in out]
    for r, s in enumerate(sels):
        if not np.array_equal(s.bits, sels[0].bits):
            raise SimulationError(f"rank {r} selected another set than rank 0")
    return {"bits": sels[0].bits, "selections": sels, "records": [rec for _, rec in out],
            "wall_s": max(walls)}
