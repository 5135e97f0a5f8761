"""The corrupt and unreachable data budget on its own (data/faults.py), with a small stream stand-in: what it
counts, what it excludes from selection, when it stops the run, and its checkpoint entry."""

from __future__ import annotations

from typing import Any

import pytest

from attent_scale.config import DataConfig
from attent_scale.data.faults import DataFaults
from attent_scale.errors import UserError


class _Stream:
    """What a ShardStream hands the budget: the bad ids and given-up shards since the last take, and its
    count of corrupt encounters."""

    def __init__(self, bad: list[int] = (), unreachable: list[str] = (), faults: int = 0) -> None:
        self.bad, self.gone, self.faults = list(bad), list(unreachable), faults

    def take_bad_ids(self) -> list[int]:
        out, self.bad = self.bad, []
        return out

    def take_unreachable(self) -> list[str]:
        out, self.gone = self.gone, []
        return out


def _faults(excluded: list[Any] | None = None, **cfg: Any) -> DataFaults:
    exclude = None if excluded is None else (lambda ids, step: excluded.append((list(ids), step)))
    return DataFaults(DataConfig(**cfg), num_samples=1000, rank=0, world=1, label="data.dir d", check_every=5,
                      exclude=exclude)


def test_corrupt_ids_are_excluded_and_counted_once_each(capsys: pytest.CaptureFixture[str]) -> None:
    excluded: list[Any] = []
    f = _faults(excluded)
    f.note(_Stream(bad=[7, 3, 7]), step=4)
    f.note(_Stream(bad=[3, 11]), step=6)
    f.note(_Stream(), step=7)
    assert f.corrupt_ids == [3, 7, 11] and excluded == [([7, 3, 7], 4), ([3, 11], 6)]
    err = capsys.readouterr().err
    assert "2 corrupt sample(s) excluded from selection (ids 3, 7); 2 distinct so far" in err
    assert "1 corrupt sample(s) excluded from selection (ids 11); 3 distinct so far" in err
    f.count(_Stream(faults=4))
    assert f.corrupt_samples == 4  # encounters, not distinct ids


def test_the_budget_stops_the_run_past_max_corrupt_fraction_on_check_steps_only() -> None:
    f = _faults(max_corrupt_fraction=0.01)
    f.note(_Stream(bad=list(range(11))), step=1)
    f.check(3, samples_trained=30)  # not a check step: nothing reduced, nothing raised
    with pytest.raises(UserError, match=r"data.dir d: 11 of 1000 training samples are corrupt \(1.1%\) at "
                                        r"step 5, over data.max_corrupt_fraction 0.01"):
        f.check(5, samples_trained=30)
    _faults(max_corrupt_fraction=1.0).check(5, 30)  # 1.0 disables it
    ok = _faults(max_corrupt_fraction=0.02)
    ok.note(_Stream(bad=list(range(11))), step=1)
    ok.check(5, samples_trained=30, now=True)


def test_an_unreachable_shard_stops_the_run_unless_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    line = "s3://b/train-000001.tar: unreachable after 5 retries"
    f = _faults()
    f.note(_Stream(unreachable=[line]), step=2)
    with pytest.raises(UserError, match=r"unreachable after 5 retries; data.dir d \(raise data.retries"):
        f.check(3, samples_trained=10, now=True)
    skip = _faults(skip_unreachable=True)
    skip.note(_Stream(unreachable=[line]), step=2)
    skip.check(3, samples_trained=10, now=True)
    assert "its samples are skipped as corrupt (data.skip_unreachable)" in capsys.readouterr().err


def test_at_the_end_a_run_that_trained_nothing_stops_and_the_entry_round_trips() -> None:
    f = _faults()
    f.note(_Stream(bad=[5]), step=0)
    f.count(_Stream(faults=2))
    with pytest.raises(UserError, match="no sample trained in 9 steps \\(1 corrupt samples met\\); nothing"):
        f.check(9, samples_trained=0, final=True)
    f.check(9, samples_trained=0)  # only the end asks for trained samples
    other = _faults()
    other.load_state_dict(f.state_dict())
    assert (other.corrupt_samples, other.corrupt_ids) == (2, [5])
