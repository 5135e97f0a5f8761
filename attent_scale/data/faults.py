"""The corrupt and unreachable data budget: the corrupt samples met (distinct ids, kept out of later
selections), the shards given up on, and when the run must stop (one component, checkpoint entry "faults")."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from attent_scale.config import DataConfig
from attent_scale.dist import all_gather_objects, all_reduce_values
from attent_scale.errors import UserError

Exclude = Callable[[list[int], int], None]  # exclude(ids, step): keep corrupt ids out of later selections


class DataFaults:
    """This rank's data faults. `corrupt_samples` counts encounters (a corrupt sample is replaced by a
    filler), `corrupt_ids` the distinct ids met, `unreachable` one line per shard URL given up on after the
    retries. `check` stops every rank together once the distinct corrupt ids (over all ranks) pass
    data.max_corrupt_fraction of the `num_samples` training ids, or a shard is unreachable (unless
    data.skip_unreachable)."""

    def __init__(self, cfg: DataConfig, *, num_samples: int, rank: int, world: int, group: Any = None,
                 label: str = "data", check_every: int = 1, exclude: Exclude | None = None) -> None:
        self.max_fraction, self.skip_unreachable = cfg.max_corrupt_fraction, cfg.skip_unreachable
        self.num_samples, self.rank, self.world, self.group = num_samples, rank, world, group
        self.label = label  # how messages name the data (never a URL's credentials)
        self.check_every = max(1, check_every)
        self.exclude = exclude
        self.corrupt_samples = 0
        self.corrupt_ids: list[int] = []
        self.unreachable: list[str] = []

    def note(self, stream: Any, step: int) -> None:
        """What `stream` (a ShardStream) met since the last call: its unreachable shards, and its corrupt
        samples, whose ids are excluded from every later selection and counted once each."""
        gone = stream.take_unreachable()
        self.unreachable += gone
        for line in gone if self.skip_unreachable else ():
            print(f"attent-scale: rank {self.rank}: warning: {line}; its samples are skipped as corrupt "
                  "(data.skip_unreachable)", file=sys.stderr)
        bad = stream.take_bad_ids()
        if not bad:
            return
        if self.exclude is not None:
            self.exclude(bad, step)
        new = sorted(set(bad).difference(self.corrupt_ids))
        if new:
            self.corrupt_ids = sorted(set(self.corrupt_ids).union(new))
            print(f"attent-scale: rank {self.rank}: {len(new)} corrupt sample(s) excluded from selection "
                  f"(ids {', '.join(map(str, new[:8]))}{' ...' if len(new) > 8 else ''}); "
                  f"{len(self.corrupt_ids)} distinct so far", file=sys.stderr)

    def count(self, stream: Any) -> None:
        """A stream is done (an epoch's, or a scoring pass's): its corrupt encounters count."""
        self.corrupt_samples += stream.faults

    def check(self, step: int, samples_trained: int, *, now: bool = False, final: bool = False) -> None:
        """Collective every `check_every` steps (and `now`, and at the end: `final`): stop every rank
        together with one line once a shard is unreachable or the distinct corrupt samples pass the budget;
        at the end, also when no real sample was trained (`samples_trained`: this rank's)."""
        if not (now or final) and step % self.check_every != 0:
            return
        seen, trained, gone = all_reduce_values(
            [len(self.corrupt_ids), samples_trained, len(self.unreachable)], "sum", self.group)
        if gone and not self.skip_unreachable:  # every rank stops here together, naming one URL
            lines = sorted(set().union(*all_gather_objects(self.unreachable, self.group)))
            more = f" ({len(lines) - 1} more shard(s) too)" if len(lines) > 1 else ""
            raise UserError(f"{lines[0]}{more}; {self.label} (raise data.retries / data.backoff, "
                            "or data.skip_unreachable: true to skip it like a corrupt shard)")
        budget = self.max_fraction * self.num_samples
        corrupt = int(seen)
        if seen > budget and self.world > 1:  # a sum over ranks counts an id two ranks met twice
            corrupt = self.distinct()
        if corrupt > budget and self.max_fraction < 1.0:
            raise UserError(
                f"{self.label}: {corrupt} of {self.num_samples} training samples are corrupt "
                f"({corrupt / self.num_samples:.1%}) at step {step}, over data.max_corrupt_fraction "
                f"{self.max_fraction} (1.0 disables; the warnings above name the shards)"
            )
        if final and trained == 0:
            raise UserError(f"{self.label}: no sample trained in {step} steps ({corrupt} corrupt "
                            "samples met); nothing exported")

    def distinct(self) -> int:
        """Collective: the distinct corrupt ids over every rank."""
        return len(set().union(*all_gather_objects(self.corrupt_ids, self.group)))

    def state_dict(self) -> dict[str, Any]:
        return {"corrupt_samples": self.corrupt_samples, "corrupt_ids": list(self.corrupt_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.corrupt_samples = int(state.get("corrupt_samples", 0))
        self.corrupt_ids = sorted(int(i) for i in state.get("corrupt_ids") or ())
