"""StreamWorkers: one set of DataLoader worker processes that serves every ShardStream iteration of a run.

A torch DataLoader with persistent workers re-runs its dataset's `__iter__` in every worker on each new
`iter(loader)` (it sends them `_ResumeIteration` and, before returning, drains what they still produced for
an abandoned iterator). So the dataset here holds no plan: just before each `iter(loader)` the main process
publishes, per physical worker, a pickle file (written to a temp name, then renamed) with the plan
restricted to that worker's logical worker, the batches it already yielded, and its logical index; the
worker reads its file when its new iteration starts. A worker only reads a file after the main process
asked it to start the iteration that file was written for, so it never sees an older plan.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class WorkerPlan(Protocol):
    """What a worker is handed: a picklable plan of `logical_workers` runs of batches (ShardStream's)."""

    @property
    def logical_workers(self) -> int:
        """Runs of batches in the plan (one per logical worker)."""
        ...

    def restrict(self, w: int) -> WorkerPlan:
        """A copy holding only what logical worker w needs."""
        ...

    def run(self, done_batches: Sequence[int], w: int) -> Iterator[Any]:
        """Logical worker w's batches after the `done_batches[w]` it already yielded."""
        ...


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore stop signals: torchrun and Slurm signal the rank's whole process group,
    and a worker that died of it would fail the rank before it can write its checkpoint. The rank
    decides; its workers exit when it closes the loader (or when it dies: they watch their parent)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class _PublishedPlan(IterableDataset):
    """Runs in each persistent worker: every new iteration yields the run of batches published for it."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # a generator, so a bad plan file raises in a fetch (re-raised in the main process with its
        # traceback), not while the worker re-creates its fetcher (which would kill the worker)
        info = get_worker_info()
        if info is None:
            raise RuntimeError("_PublishedPlan runs only inside a DataLoader worker")
        with open(os.path.join(self.directory, f"worker{info.id}.pkl"), "rb") as f:
            plan, done_batches, w = pickle.load(f)
        yield from plan.run(done_batches, w)


def _scratch_dir() -> str:
    """A private temp dir for the plan files: in memory (/dev/shm) where the system has one."""
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
    return tempfile.mkdtemp(prefix="attent-stream-", dir=base)


class StreamWorkers:
    """`num_workers` DataLoader workers, started on first use and kept until `close()`; every ShardStream
    given this object (`workers=`) iterates through them. One iteration at a time: starting a new one
    ends the previous one (a stream still holding it raises instead of yielding another stream's data)."""

    def __init__(self, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"StreamWorkers needs num_workers >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.generation = 0  # bumped by every iteration started
        self._dir: str | None = None
        self._loader: DataLoader | None = None
        self._cleanup: weakref.finalize | None = None
        self._closed = False

    def _start(self) -> DataLoader:
        self._dir = _scratch_dir()
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        self._loader = DataLoader(_PublishedPlan(self._dir), batch_size=None, num_workers=self.num_workers,
                                  persistent_workers=True, worker_init_fn=ignore_stop_signals)
        return self._loader

    def _write(self, name: str, obj: Any) -> None:
        assert self._dir is not None
        path = os.path.join(self._dir, name)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)

    def iterate(self, plan: WorkerPlan, done_batches: Sequence[int], rotation: int) -> Iterator[Any]:
        """The batches of `plan` from the position (batches done per logical worker, next worker), as the
        DataLoader delivers them; starting the next iteration ends this one."""
        if self._closed:
            raise RuntimeError("StreamWorkers is closed")
        if plan.logical_workers != self.num_workers:
            raise ValueError(f"a plan for {plan.logical_workers} workers given to {self.num_workers} workers")
        loader = self._loader if self._loader is not None else self._start()
        for physical in range(self.num_workers):
            w = (physical + rotation) % plan.logical_workers
            self._write(f"worker{physical}.pkl", (plan.restrict(w), list(done_batches), w))
        self.generation += 1
        return self._guarded(iter(loader), self.generation)

    def _guarded(self, it: Iterator[Any], generation: int) -> Iterator[Any]:
        # the loader has one iterator, reset by every iteration: an older holder must not take its items
        while True:
            if self.generation != generation:
                raise RuntimeError("StreamWorkers: this iteration was ended by a later one (one iteration "
                                   "at a time)")
            try:
                item = next(it)
            except StopIteration:
                return
            yield item

    def pids(self) -> list[int]:
        """The worker processes' ids (empty before the first iteration)."""
        it = self._loader._iterator if self._loader is not None else None
        return [p.pid for p in it._workers] if it is not None else []

    def close(self) -> None:
        """Stop the workers and remove the plan files; idempotent."""
        self._closed = True
        loader, self._loader = self._loader, None
        if loader is not None and loader._iterator is not None:
            it, loader._iterator = loader._iterator, None
            it._shutdown_workers()  # what torch runs when the iterator is collected, done now
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> StreamWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
