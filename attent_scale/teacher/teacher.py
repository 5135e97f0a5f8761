"""The Teacher: decides per epoch what to score and select (cycle / ledger / online modes)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from attent_scale.config import TeacherConfig
from attent_scale.data.selection import Selection
from attent_scale.teacher import plan as planning
from attent_scale.teacher.comm import Comm, collective_ops, resolve_group
from attent_scale.teacher.floors import SourceRange, apply_floors, source_report
from attent_scale.teacher.ledger import SCORE, TRAIN, Ledger
from attent_scale.teacher.online import online_pick
from attent_scale.teacher.picks import strategy
from attent_scale.teacher.plan import EpochPlan
from attent_scale.teacher.records import RecordWriter, make_record
from attent_scale.teacher.signals import NUM_BINS
from attent_scale.teacher.topk import key_image, kth_largest, select_global
from attent_scale.teacher.view import Pick, TeacherView

STATE_FORMAT = 2  # 2: dense ledger blocks, selection bits not copied
EXCHANGE_EVERY = 64  # training steps (or scoring batches) between two ledger exchanges
STAT_KEYS = (
    "seconds_score", "seconds_collective", "seconds_select", "seconds_share", "seconds_rebalance",
    "samples_scored", "bytes_sent", "nonfinite", "selections", "last_ratio", "last_k",
    "last_staleness_median", "last_staleness_max",
)


def topk_threshold(v: TeacherView, pick: Pick, report: dict[str, Any]) -> Selection:
    """Top-k by a global threshold on the key images, found in rounds of histograms (O(N / world) per
    rank, a bitset out)."""
    images, nbits = pick.images or ((lambda: (key_image(c) for c in pick.key_chunks())), 64)
    return Selection(v.top_bits(images, pick.k, bits=nbits, report=report), v.num_samples)


def topk_gather(v: TeacherView, pick: Pick, report: dict[str, Any]) -> Selection:
    """Top-k with every rank holding all N (key, id) pairs: exact, for up to ~10^7 samples."""
    lo, hi = v.ledger.lo, v.ledger.hi
    parts = list(pick.key_chunks())
    keys = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    chosen = select_global(keys, np.arange(lo, hi, dtype=np.int64), pick.k, method="gather", group=v.group,
                           report=report)
    return Selection.from_ids(chosen, v.num_samples)


TOPK_METHODS: dict[str, Callable[[TeacherView, Pick, dict[str, Any]], Selection]] = {
    "threshold": topk_threshold,
    "gather": topk_gather,
}


def _topk_method(name: str) -> Callable[[TeacherView, Pick, dict[str, Any]], Selection]:
    try:
        return TOPK_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown topk_method {name!r} (one of {', '.join(TOPK_METHODS)})") from None


class StopRequest(Protocol):
    """A trainer's stop flag as a scoring pass polls it: an agreed poll every `every` batches (every rank
    the same), and whether this rank got a stop signal (`requested`, local: no collective)."""

    every: int

    def requested(self) -> bool: ...


class ScoringStopped(Exception):
    """A stop signal on some rank ended a scoring pass early; every rank raises it after the same round."""


class _Rounds:
    """The lockstep rounds of one scoring pass: a rank counts its rounds, so every rank exchanges in the
    same ones (every `exchange_every`-th, and the last), polls the stop flag in each, and raises
    ScoringStopped in the same one. On one process there is no collective: the flag alone decides."""

    def __init__(self, teacher: Teacher, comm: Comm | None, stop: StopRequest | None, *,
                 exchange_every: int) -> None:
        self.teacher, self.comm, self.stop, self.exchange_every = teacher, comm, stop, exchange_every
        self.count = 0

    def run(self, *, done: bool) -> bool:
        """One round; True once every rank is done (raises ScoringStopped when some rank has a stop flag)."""
        self.count += 1
        flag = self.stop is not None and self.stop.requested()
        if self.comm is None:
            if flag:
                raise ScoringStopped(f"stop signal after {self.count} round(s) of the scoring pass")
            return done
        all_done, stopping = self.teacher._exchange_round(
            self.comm, done=done, stop=flag, exchange=self.count % self.exchange_every == 0)
        if stopping:
            raise ScoringStopped(f"stop signal after {self.count} round(s) of the scoring pass")
        return all_done


class Teacher:
    """Globally consistent AtteNT selection; every public method that says "collective" must be called
    by all ranks in the same order."""

    def __init__(self, cfg: TeacherConfig, *, num_samples: int, seed: int, record_path: Path | None = None,
                 group: Any = None, reference: Any = None, sources: list[Any] | None = None) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.cfg = cfg
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.group = resolve_group(group)
        ops = collective_ops(self.group)
        self.world_size = ops.get_world_size(self.group) if self.group is not None else 1
        self.rank = ops.get_rank(self.group) if self.group is not None else 0
        self.ledger = Ledger(self.num_samples, self.rank, self.world_size, history=cfg.strategy == "signal")
        # strategy signal: the val pass's per-sample loss histogram (summed over ranks) and its step
        self.val_hist = np.zeros(NUM_BINS, dtype=np.int64)
        self.val_step: int | None = None
        self.reference = reference  # teacher.score=excess: a teacher.reference.Reference, else None
        # the training ids by source (teacher/floors.py): a blend's sources, else one source of all ids
        self.sources = list(sources) if sources else [SourceRange("data", 0, self.num_samples)]
        self._writer = RecordWriter(record_path if self.rank == 0 else None)
        self._cache_cycle = -1
        self._cache: Selection | None = None
        self.anneal_from: int | None = None  # first epoch of the final all-data phase (set by start_anneal)
        self._score_seconds_pending = 0.0
        self._scored_pending = 0
        self.last_record: dict[str, Any] | None = None
        self.kept_counts: dict[int, int] = {}  # epoch -> ids its selection kept, where the plan reads it
        self.stats: dict[str, Any] = {key: 0 for key in STAT_KEYS}
        for key in ("last_ratio", "last_staleness_median", "last_staleness_max"):
            self.stats[key] = None
        for key in STAT_KEYS:
            if key.startswith("seconds_"):
                self.stats[key] = 0.0

    # ------------------------------------------------------------------ planning (teacher/plan.py)

    @property
    def mode(self) -> str:
        """"none", "cycle", "ledger" or "online"."""
        return self.cfg.mode

    def plan_epoch(self, epoch: int) -> EpochPlan:
        """The epoch's plan (plan.plan_epoch): the same on every rank and after a resume."""
        return planning.plan_epoch(self.cfg, epoch, self.anneal_from)

    def anneal_epoch(self, max_epochs: float) -> int | None:
        """First epoch of the all-data anneal under an epoch budget (None without annealing)."""
        return planning.anneal_epoch(self.cfg, max_epochs)

    def start_anneal(self, epoch: int) -> None:
        """From `epoch` on every epoch trains all data with weight 1 (an earlier start is kept)."""
        if self.cfg.mode in ("cycle", "ledger"):
            self.anneal_from = epoch if self.anneal_from is None else min(self.anneal_from, epoch)

    def planned_count(self, plan: EpochPlan, num: int) -> int:
        """Samples an epoch of `plan` trains out of `num` (plan.planned_count, with the counts the
        selections so far kept)."""
        return planning.planned_count(self.cfg, plan, num, num_samples=self.num_samples,
                                      kept_counts=self.kept_counts)

    def candidate_batch_size(self, batch_size: int) -> int:
        """Per-rank batch size to draw from the stream: ceil(B / online_ratio) in online mode, else B."""
        return planning.candidate_batch_size(self.cfg, batch_size)

    # ------------------------------------------------------------------ observing

    def score_pass(self, stream: Iterable[dict[str, torch.Tensor]],
                   score_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], step: int,
                   stop: StopRequest | None = None) -> int:
        """Collective: score every batch of this rank's stream (no grad) into the ledger; returns samples
        scored here. Every EXCHANGE_EVERY batches (and at the end) the ranks exchange pending observations,
        in rounds every rank joins until all are done, so ranks may hold different numbers of batches.
        With `stop`, a round every `stop.every` batches also carries each rank's stop flag: once any rank
        has one, every rank raises ScoringStopped after the same round (the ledger keeps what was scored:
        observations fold by a max rule, so scoring those ids again at this step changes nothing)."""
        t0 = time.perf_counter()
        n = nonfinite = 0
        comm = self._comm()
        every = max(1, int(stop.every)) if stop is not None else EXCHANGE_EVERY
        rounds = _Rounds(self, comm, stop, exchange_every=max(1, EXCHANGE_EVERY // every))
        try:
            with torch.no_grad():
                for i, batch in enumerate(stream):
                    scores = score_fn(batch)
                    nonfinite += self.ledger.observe(batch["ids"], scores, step, kind=SCORE)
                    n += int((batch["ids"] >= 0).sum())  # filler rows (id -1) of a padded share are no sample
                    if (i + 1) % every == 0:
                        rounds.run(done=False)
            while not rounds.run(done=True):
                pass
        finally:
            close = getattr(stream, "close", None)
            if close is not None:  # a generator left early: its reader stops now, not at garbage collection
                close()
        dt = time.perf_counter() - t0
        self.stats["nonfinite"] += nonfinite
        self.stats["seconds_score"] += dt
        self.stats["samples_scored"] += n
        self._score_seconds_pending += dt
        self._scored_pending += n
        return n

    def _exchange_round(self, comm: Comm, *, done: bool, stop: bool = False, exchange: bool = True
                        ) -> tuple[bool, bool]:
        """One lockstep round: (has every rank said it is done, has any rank a stop flag); the pending
        observations go to their owners when `exchange` (every rank passes the same) or when all are done."""
        flags = torch.tensor([0 if done else 1, 1 if stop else 0], dtype=torch.int64)
        comm.all_reduce(flags, "consolidate")
        all_done, stopping = int(flags[0].item()) == 0, int(flags[1].item()) > 0
        if (exchange or all_done) and not stopping:
            self.ledger.exchange(comm=comm)
        return all_done, stopping

    def add_score_seconds(self, seconds: float) -> None:
        """Scoring forwards a trainer ran for the teacher outside a scoring pass (online mode's candidates):
        selection cost, booked in the score phase."""
        self.stats["seconds_score"] += float(seconds)

    def observe(self, ids: torch.Tensor, losses: torch.Tensor, step: int) -> None:
        """Record training-forward losses (free scores). A no-op in online and none modes."""
        if self.cfg.mode in ("cycle", "ledger"):
            self.stats["nonfinite"] += self.ledger.observe(ids, losses, step, kind=TRAIN)

    def observe_val(self, hist: np.ndarray, step: int) -> None:
        """The per-sample val losses of an evaluation at `step`, as a histogram summed over every rank
        (`signals.histogram` bins): what strategy signal's thresholds come from."""
        self.val_hist = np.asarray(hist, dtype=np.int64).copy()
        self.val_step = int(step)

    def exclude(self, ids: list[int], step: int) -> None:
        """Corrupt samples: recorded as a non-finite loss, which hard/soft never select (unseen ids would
        be kept in every selection). A later readable observation of the id overrides it."""
        if self.cfg.mode in ("cycle", "ledger") and ids:
            self.ledger.observe(np.asarray(ids, dtype=np.int64), np.full(len(ids), np.nan, np.float32), step,
                                kind=SCORE)

    # ------------------------------------------------------------------ selecting

    def _comm(self) -> Comm | None:
        return Comm(self.group) if self.group is not None else None

    def view(self, comm: Comm | None) -> TeacherView:
        """What a strategy sees of this teacher for one selection (teacher/view.py), talking over `comm`."""
        return TeacherView(cfg=self.cfg, num_samples=self.num_samples, seed=self.seed, rank=self.rank,
                           world_size=self.world_size, group=self.group, ledger=self.ledger,
                           reference=self.reference, sources=self.sources, val_hist=self.val_hist,
                           val_step=self.val_step, comm=comm)

    @staticmethod
    def _staleness(v: TeacherView, step: int, n_obs: int) -> dict[str, int] | None:
        """Global count, lower median and max of the age (step - observed step, at least 0) of observed
        ids, from the ledger blocks in chunks. Each entry maps to y = 2 * age + (1 - kind) (0 for unseen
        ids, below every observed one), which orders like the age; y < 2 * step + 3, so up to 2**19 steps
        one histogram pass is exact."""
        if n_obs == 0:
            return None
        top = np.int64(2 * int(step) + 2)
        nbits = max(1, int(top).bit_length())

        def ys() -> Any:
            for b in v.blocks():
                y = top - (b.entries >> np.uint64(32)).view(np.int64)
                y[~b.seen] = 0
                np.maximum(y, 0, out=y)
                yield y.view(np.uint64)

        k_med = n_obs - (n_obs - 1) // 2  # the lower median of the ages is this k-th largest
        if nbits <= 20:
            h = np.zeros(1 << nbits, dtype=np.int64)
            for y in ys():
                h += np.bincount(y.view(np.int64), minlength=1 << nbits)
            h = v.all_reduce(h)
            above = np.cumsum(h[::-1])  # above[j] = count of values >= (len - 1 - j)
            median = len(h) - 1 - int(np.searchsorted(above, k_med))
            oldest = int(np.flatnonzero(h)[-1])
        else:
            median, _, _ = kth_largest(ys, k_med, v.comm, bits=nbits)
            oldest, _, _ = kth_largest(ys, 1, v.comm, bits=nbits)
        return {"n": n_obs, "median": int(median) >> 1, "max": int(oldest) >> 1}

    def exchange_due(self, step: int) -> None:
        """Collective, called by every rank after each training step (cycle and ledger modes): every
        EXCHANGE_EVERY steps, pending ledger observations go to their owner ranks, so a rank never holds
        more than a few steps of other ranks' observations. A no-op in other modes."""
        if self.cfg.mode in ("cycle", "ledger") and step % EXCHANGE_EVERY == 0 and self.group is not None:
            comm = self._comm()
            self.ledger.exchange(comm=comm)
            self.stats["seconds_collective"] += comm.seconds.get("consolidate", 0.0)
            self.stats["bytes_sent"] += comm.bytes.get("consolidate", 0)

    def select(self, epoch: int, step: int) -> Selection:
        """Collective (cycle and ledger modes): the selection for a subset epoch, identical on every rank.
        Ids never observed are always kept; non-finite losses are never selected by hard/soft. hard and
        random reuse the cycle's first selection in later subset epochs; soft re-selects each epoch. The
        strategy (picks.STRATEGIES) says what to keep, the top-k method (TOPK_METHODS) finds it."""
        if self.cfg.mode not in ("cycle", "ledger"):
            raise ValueError(f"select() is for cycle and ledger modes, not {self.cfg.mode!r}")
        plan = self.plan_epoch(epoch)
        if not plan.subset:
            raise ValueError(f"epoch {epoch} is not a subset epoch ({plan.phase})")
        cfg, strat = self.cfg, strategy(self.cfg.strategy)
        if (cfg.mode == "cycle" and strat.reuse and plan.index > 0
                and self._cache is not None and self._cache_cycle == plan.cycle):
            if any(s.floor for s in self.sources):
                self.kept_counts[int(epoch)] = self._cache.count
            return self._cache
        comm = self._comm()
        view = self.view(comm)
        t0 = time.perf_counter()
        ratio = float(plan.ratio if plan.ratio is not None else 1.0)
        if strat.reads_losses:  # pending observations to their owners first
            self.ledger.exchange(comm=comm)
        pick = strat.pick(view, epoch, ratio)
        t_keys = time.perf_counter() - t0
        report: dict[str, Any] = {}
        selection = _topk_method(cfg.topk_method)(view, pick, report)
        if pick.after is not None:
            selection = pick.after(selection)
        selection, added = apply_floors(view, pick, selection)
        if pick.plans_count or any(s.floor for s in self.sources):  # the plan follows the kept count
            self.kept_counts[int(epoch)] = selection.count
        sources = source_report(view, selection, added)
        t_st, coll_st = time.perf_counter(), comm.seconds.get("collective", 0.0) if comm else 0.0
        staleness = self._staleness(view, step, pick.n_obs) if strat.staleness else None
        # its passes over the ledger are selection work too (its all-reduce is counted as collective)
        coll_st = (comm.seconds.get("collective", 0.0) - coll_st) if comm else 0.0
        t_keys += time.perf_counter() - t_st - coll_st
        record = dict(
            step=int(step), epoch=int(epoch), cycle=plan.cycle, mode=cfg.mode, strategy=cfg.strategy,
            method=report["method"], ratio=ratio, k=int(pick.k), n_scored=int(pick.n_obs),
            n_selected=selection.count, n_unseen=int(self.num_samples - pick.n_obs),
            n_nonfinite=int(pick.n_nonfinite), world_size=self.world_size,
            sha256=selection.sha256 if self.rank == 0 else None, staleness=staleness, sources=sources,
            signal=pick.record if cfg.strategy in ("signal", "learn", "rho") else None,
            selection_bits=selection.bits.tobytes().hex() if cfg.record_bits and self.rank == 0 else None)
        self._settle(comm, report, t_keys, {"score": self._score_seconds_pending}, bytes_max=True,
                     record=record)
        if cfg.mode == "cycle" and strat.reuse:
            self._cache, self._cache_cycle = selection, plan.cycle
        return selection

    def _settle(self, comm: Comm | None, report: dict[str, Any], t_select: float, extra: dict[str, float],
                *, bytes_max: bool, record: dict[str, Any] | None) -> None:
        """The accounting of one selection: seconds by phase (the top-k's report, the comm's collectives,
        `t_select` of key work, `extra` phases) and bytes sent (the top-k's and the comm's), into the
        stats; with `record` fields, the selection record carrying them is built and written (with
        `bytes_max`, a collective: the largest rank's bytes)."""
        seconds = {
            **extra,
            "collective": report["seconds"]["collective"] + (comm.seconds.get("consolidate", 0.0)
                                                             + comm.seconds.get("collective", 0.0)
                                                             if comm else 0.0),
            "select": report["seconds"]["select"] + t_select,
            "share": report["seconds"]["share"],
        }
        bytes_rank = dict(report["bytes_sent"])
        for phase, nbytes in (comm.bytes.items() if comm else []):
            bytes_rank[phase] = bytes_rank.get(phase, 0) + nbytes
        total_bytes = int(sum(bytes_rank.values()))
        if record is None:
            for phase in ("collective", "select", "share", "rebalance"):
                self.stats[f"seconds_{phase}"] += float(seconds.get(phase, 0.0))
            self.stats["bytes_sent"] += total_bytes
            self.stats["selections"] += 1
            return
        bmax = None
        if bytes_max:
            t = torch.tensor([total_bytes], dtype=torch.int64)
            if comm is not None:
                comm.ops.all_reduce(t, dist.ReduceOp.MAX, self.group)
            bmax = int(t.item())
        rec = make_record(**record, seconds=seconds, bytes_per_rank=bytes_rank, bytes_per_rank_max=bmax)
        self._finish(rec, seconds, total_bytes)

    def _finish(self, record: dict[str, Any], seconds: dict[str, float], total_bytes: int) -> None:
        for phase in ("collective", "select", "share", "rebalance"):
            self.stats[f"seconds_{phase}"] += float(seconds.get(phase, 0.0))
        self.stats["bytes_sent"] += total_bytes
        self.stats["selections"] += 1
        self.stats["last_ratio"] = record["ratio"]
        self.stats["last_k"] = record["k"]
        st = record["staleness"]
        self.stats["last_staleness_median"] = st["median"] if st else None
        self.stats["last_staleness_max"] = st["max"] if st else None
        self._score_seconds_pending = 0.0
        self._scored_pending = 0
        self.last_record = record
        self._writer.write(record)

    # ------------------------------------------------------------------ online mode

    def online_pick(self, batch: dict[str, Any], scores: torch.Tensor, batch_size: int,
                    step: int) -> dict[str, Any]:
        """Collective (online mode): this step's batch, picked from every rank's candidates by their
        `scores` and dealt so that every rank trains the same number (teacher/online.py)."""
        comm = self._comm()
        due = step % max(1, self.cfg.online_record_every) == 0 or self.last_record is None
        picked = online_pick(self.view(comm), batch, scores, batch_size, step, record=due)
        self.stats["nonfinite"] += picked.nonfinite
        self.stats["samples_scored"] += picked.scored
        self._settle(comm, picked.report, picked.seconds_keys, {"rebalance": picked.seconds_rebalance},
                     bytes_max=False, record=picked.record)
        return picked.batch

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Per-rank state: ledger tensors (safetensors-ready), cached cycle selection, stats, last record.
        Noise is counter-based (seed, cycle, id), so there is no RNG state to save."""
        return {
            "format": STATE_FORMAT,
            "mode": self.cfg.mode,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "rank": self.rank,
            "ledger": self.ledger.state_tensors(),
            "cache_cycle": self._cache_cycle,
            # the same array the trainer saves as the epoch's selection: checkpoint.save_state stores it once
            "cache_bits": self._cache.bits if self._cache is not None else None,
            "cache_upweight": (self._cache.upweight if self._cache is not None else None),
            "cache_weight": self._cache.weight if self._cache is not None else 1.0,
            "anneal_from": self.anneal_from,
            "score_seconds_pending": self._score_seconds_pending,
            "scored_pending": self._scored_pending,
            "stats": dict(self.stats),
            "last_record": self.last_record,
            "kept_counts": dict(self.kept_counts),
            "val_hist": self.val_hist if self.cfg.strategy == "signal" else None,  # 32 KB, only where used
            "val_step": self.val_step,
        }

    def load_state_dict(self, state: dict[str, Any], peers: dict[int, dict[str, Any]] | None = None) -> None:
        """Restore state_dict(); seed, sample count and mode must match. A state of another world size
        (elastic resume) needs `peers`: old rank -> that rank's teacher state (tensors may be lazy handles)
        for the old ranks whose ledger blocks overlap this rank's new block and those folded onto this
        rank (old rank r goes to new rank r mod world): the ledger is re-blocked, and the per-rank
        counters of folded ranks are summed so totals over ranks stay right."""
        old_world = state.get("world_size")
        elastic = old_world != self.world_size and peers is not None
        checks = [("seed", self.seed), ("num_samples", self.num_samples), ("mode", self.cfg.mode)]
        if not elastic:
            checks += [("world_size", self.world_size), ("rank", self.rank)]
        for key, mine in checks:
            if state.get(key) != mine:
                raise ValueError(f"teacher state has {key}={state.get(key)!r}, this run has {mine!r}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"teacher state format {state.get('format')!r} != {STATE_FORMAT}")
        fold: list[int] = []
        if elastic:
            assert peers is not None
            fold = sorted(r for r in peers if r % self.world_size == self.rank)
            self.ledger = Ledger.reblock(self.num_samples, self.rank, self.world_size, int(old_world),
                                         {r: p["ledger"] for r, p in peers.items()}, fold)
        else:
            self.ledger = Ledger.from_state_tensors(state["ledger"])
        self._cache_cycle = int(state["cache_cycle"])
        bits = state["cache_bits"]
        up = state.get("cache_upweight")
        self._cache = (Selection(bits, self.num_samples, upweight=None if up is None else up,
                                 weight=float(state.get("cache_weight", 1.0)))
                       if bits is not None else None)
        self.anneal_from = state.get("anneal_from")
        self._score_seconds_pending = float(state["score_seconds_pending"])
        self._scored_pending = int(state["scored_pending"])
        self.stats = dict(state["stats"])
        self.last_record = state["last_record"]
        self.kept_counts = {int(e): int(c) for e, c in (state.get("kept_counts") or {}).items()}
        if state.get("val_hist") is not None:
            self.val_hist = np.asarray(state["val_hist"], dtype=np.int64).copy()
            self.val_step = state.get("val_step")
        if self.cfg.strategy == "signal":
            self.ledger.enable_history()
        if elastic:  # counters summed over ranks (summary.json): old ranks folded onto this one
            assert peers is not None
            self._scored_pending = sum(int(peers[r]["scored_pending"]) for r in fold)
            self.stats["samples_scored"] = sum(int(peers[r]["stats"]["samples_scored"]) for r in fold)
