"""A two-source blend trained by 2 real ranks: same selection on both, per-source counts, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_runner import check, read_lines, run_train, selection_hashes, step_losses, tiny_run_config

from attent_scale.checkpoint import load_state
from attent_scale.data.selection import Selection


def _blend_config(run_dir: Path, a: Path, b: Path) -> dict:
    cfg = tiny_run_config(run_dir, a, "fsdp", train={"max_steps": 12, "stop_check_every": 3})
    # 320 ids: code 2/3 of them, prose 1/3 (each a seeded draw of its set), a floor on prose
    cfg["data"] = {"shuffle_buffer": 64, "blend_samples": 320, "sources": [
        {"dir": str(a), "name": "code", "weight": 2},
        {"dir": str(b), "name": "prose", "weight": 1, "floor": 0.3}]}
    return cfg


@pytest.mark.timeout(900)
def test_two_ranks_on_a_blend_select_alike_report_per_source_and_resume_exactly(
        tmp_path: Path, blend_shards: tuple[Path, Path]) -> None:
    a, b = blend_shards
    straight = _blend_config(tmp_path / "straight", a, b)
    check(run_train(straight, nproc=2))
    broken = _blend_config(tmp_path / "broken", a, b)
    stopped = run_train(broken, nproc=2, env={"ATTENT_STOP_AFTER_STEP": "5"})
    assert stopped.returncode == 1, stopped.stderr[-3000:]  # torchrun reports the requeue exit as 1
    ckpt = tmp_path / "broken" / "checkpoints" / "step-00000006"
    assert (ckpt / "COMPLETE").exists()
    check(run_train(broken, nproc=2))

    records = read_lines(tmp_path / "straight" / "selection.jsonl")
    assert len(records) >= 3
    for rec in records:  # the per-source report adds up to the selection
        code, prose = rec["sources"]
        assert (code["name"], prose["name"]) == ("code", "prose")
        assert code["samples"] + prose["samples"] == rec["n_scored"] + rec["n_unseen"]
        assert code["selected"] + prose["selected"] == rec["n_selected"]
        assert all(s["dropped"] == s["samples"] - s["selected"] for s in (code, prose))
        assert prose["selected"] >= round(0.3 * prose["samples"])  # the floor holds
        assert code["mean_loss"] > 0 and prose["mean_loss"] > 0
    assert (code["samples"], prose["samples"]) == (213, 107)
    assert any(r["sources"][1]["floor_added"] > 0 for r in records)  # ratio 0.1 alone would starve it
    # both ranks hold the same selection bits at the checkpoint, the one the record names
    bits = [np.asarray(load_state(ckpt / f"rank-{r:05d}")["selection"]["bits"]) for r in range(2)]
    assert np.array_equal(bits[0], bits[1])
    n = records[0]["n_scored"] + records[0]["n_unseen"]
    at_stop = [r for r in read_lines(tmp_path / "broken" / "selection.jsonl") if r["step"] <= 6][-1]
    assert Selection(bits[0], n).sha256 == at_stop["sha256"]
    # resume: the same selections and the same losses as the uninterrupted run
    assert selection_hashes(tmp_path / "broken") == selection_hashes(tmp_path / "straight")
    assert [r["sources"] for r in read_lines(tmp_path / "broken" / "selection.jsonl")] == \
        [r["sources"] for r in records]
    x, y = step_losses(tmp_path / "straight"), step_losses(tmp_path / "broken")
    assert sorted(x) == sorted(y) == list(range(1, 13))
    for step in x:
        assert y[step] == pytest.approx(x[step], rel=1e-4, abs=1e-5), step
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["world_size"] == 2
