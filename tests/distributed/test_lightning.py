"""Lightning's AttentCallback as real processes: exact resume inside a subset epoch on 2 gloo ranks (and
another world size refused), and the steps budget's anneal ending a subset epoch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lightning_worker import launch

from attent_scale.teacher import read_records

pytestmark = pytest.mark.slow
# the default schedule with strategy hard in cycle mode: a scoring pass over both ranks' shares at every
# subset epoch's start; on 2 ranks x batch 2 x 2 accumulated the epochs start at steps 0, 8, 10, 13 and the
# run ends at 17 (epoch 2: 13 ids a rank, batches of 2, 2, 2, 2, 1 in 3 steps)
CYCLE = dict(mode="cycle", strategy="hard", ratio_schedule="cosine", initial_ratio=0.2, final_ratio=0.8,
             total_cycles=5, interval_schedule="fixed", initial_interval=1, warmup_epochs=1,
             full_epochs_per_cycle=0, rescore="stale")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _records(out: Path) -> list[dict[str, Any]]:
    """The selection records without their timings."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_records(out / "selection.jsonl")]


def test_resume_inside_a_subset_epoch_trains_what_an_uninterrupted_run_does(tmp_path: Path) -> None:
    """Stopped at step 11 (one step, two batches, into the 3-step subset epoch 2) with a Lightning
    checkpoint there, then resumed from it (on 2 ranks; on 1 it is refused): every rank trains the same
    ids in every micro batch with the same per-sample losses as without the stop, and the selection
    records are the same (the resumed run's truncated to the checkpoint's and continued)."""
    spec = dict(batch=2, accum=2, epochs=4, teacher=CYCLE)
    full = launch(tmp_path, "full", 2, **spec)
    assert [e["step"] for e in _jsonl(full / "epochs.rank0.jsonl")] == [0, 8, 10, 13]
    cut = launch(tmp_path, "cut", 2, save_every=11, stop_after_step=11, **spec)
    ckpt = cut / "ckpt" / "epoch=2-step=11.ckpt"
    assert [r["epoch"] for r in read_records(cut / "selection.jsonl")] == [1, 2] and ckpt.is_file()
    launch(tmp_path, "cut", 2, resume=str(ckpt), **spec)
    for r in range(2):
        want, got = _jsonl(full / f"ids.rank{r}.jsonl"), _jsonl(cut / f"ids.rank{r}.jsonl")
        assert sorted({x["step"] for x in got}) == list(range(17)) and got == want  # each micro batch
        assert _jsonl(cut / f"losses.rank{r}.jsonl") == _jsonl(full / f"losses.rank{r}.jsonl")
    assert _records(cut) == _records(full) and len(_records(full)) == 3
    assert json.loads((cut / "done.json").read_text()) == {"global_step": 17, "total_steps": 17}
    # the teacher state is per rank: the checkpoint refuses another world size in one line
    one = launch(tmp_path, "one", 1, fails=True, resume=str(ckpt), **spec)
    assert "UserError: AttentCallback: the checkpoint was written by 2 ranks, this run has 1" in \
        (one / "stderr.txt").read_text()


def test_steps_budget_anneal_ends_the_subset_epoch(tmp_path: Path) -> None:
    """As AttentTrainer's test: max_steps 20, anneal_fraction 0.3, so from step 14 on all data with weight
    1; the subset epoch 1 (51 of 64 ids, 7 steps from step 8) ends after its 6th step and epoch 2 trains
    every id."""
    teacher = dict(mode="ledger", strategy="hard", warmup_epochs=1, ratio_schedule="constant",
                   initial_ratio=0.8, final_ratio=0.8, anneal_fraction=0.3)
    out = launch(tmp_path, "anneal", 1, epochs=-1, max_steps=20, teacher=teacher)
    starts = [(e["epoch"], e["step"], e["sha256"] is not None) for e in _jsonl(out / "epochs.rank0.jsonl")]
    assert starts == [(0, 0, False), (1, 8, True), (2, 14, False)]
    assert [r["n_selected"] for r in read_records(out / "selection.jsonl")] == [51]
    assert [len(x["ids"]) for x in _jsonl(out / "ids.rank0.jsonl")] == [8] * 20
