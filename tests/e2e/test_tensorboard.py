"""TensorBoard scalars of a native run (metrics.tensorboard_dir), read back with TensorBoard's own reader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_runner import check, read_lines, run_train, tiny_run_config

from attent_scale.checkpoint import latest_checkpoint
from attent_scale.tensorboard import board_dir, open_board

PHASES = ("score", "collective", "select", "share", "rebalance")
STEP_TAGS = ("train/loss", "train/lr", "train/tokens_per_second", "selection/ratio",
             *(f"selection/seconds/{p}" for p in PHASES))


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def scalar_steps(log_dir: Path) -> dict[str, list[int]]:
    """The steps of each scalar tag in `log_dir`'s event files, as TensorBoard reads them."""
    return {tag: [s for s, _ in points] for tag, points in _scalars(log_dir).items()}


def _run(tmp_path: Path, shards: Path, **sections: dict) -> dict:
    sections = {
        "train": {"max_steps": 6, "log_every": 2, **sections.pop("train", {})},
        "eval": {"every_steps": 3, "max_batches": 1},
        "metrics": {"tensorboard_dir": "tb"},
        **sections,
    }
    return tiny_run_config(tmp_path / "run", shards, **sections)


@pytest.mark.slow
def test_scalars_at_the_logged_steps_and_every_eval_once_after_a_resume(tmp_path: Path,
                                                                        tiny_shards: Path) -> None:
    cfg = _run(tmp_path, tiny_shards, checkpoint={"every_steps": 4, "resume": True})
    check(run_train(cfg))
    run_dir = tmp_path / "run"
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    scalars = _scalars(run_dir / "tb")
    assert set(scalars) == {*STEP_TAGS, "val/loss"}
    jsonl = {r["step"]: r for r in read_lines(run_dir / "metrics.jsonl")}
    assert list(jsonl) == [2, 4, 6]  # log_every 2
    for tag in STEP_TAGS:
        assert [s for s, _ in scalars[tag]] == [2, 4, 6], tag
    assert [s for s, _ in scalars["val/loss"]] == [0, 3, 6]
    # the same numbers the JSON logs carry
    for step, loss in scalars["train/loss"]:
        assert loss == pytest.approx(jsonl[step]["loss"], rel=1e-6)
    for step, ratio in scalars["selection/ratio"]:
        assert ratio == pytest.approx(jsonl[step]["selected_ratio"], rel=1e-6)
    evals = {r["step"]: r["val_loss"] for r in read_lines(run_dir / "eval.jsonl")}
    assert {s: pytest.approx(v, rel=1e-6) for s, v in scalars["val/loss"]} == evals
    # cycle mode scored and selected before the first step: cumulative seconds, never decreasing
    score = [v for _, v in scalars["selection/seconds/score"]]
    assert score[0] > 0 and score == sorted(score)

    # as if the run had died after step 6 with its last checkpoint at step 4: steps 5 and 6 run again
    last = latest_checkpoint(run_dir)
    assert last is not None and last.name.endswith("6")
    shutil.rmtree(last)
    first = dict(scalars["train/loss"])
    check(run_train(cfg))
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 2
    steps = scalar_steps(run_dir / "tb")
    assert steps["train/loss"] == [2, 4, 6] and steps["val/loss"] == [0, 3, 6]  # each step once
    resumed = dict(_scalars(run_dir / "tb")["train/loss"])
    assert resumed[2] == first[2] and resumed[4] == first[4]  # up to the checkpoint: the first attempt's

    # a fresh run in the same run_dir starts its curves over
    check(run_train({**cfg, "checkpoint": {**cfg["checkpoint"], "resume": False},
                     "train": {**cfg["train"], "max_steps": 2}}))
    assert scalar_steps(run_dir / "tb")["train/loss"] == [2]


def test_relative_dir_is_under_run_dir_and_empty_is_off(tmp_path: Path) -> None:
    assert board_dir("", tmp_path) is None
    assert board_dir("tb", tmp_path) == tmp_path / "tb"
    assert board_dir(str(tmp_path / "elsewhere"), Path("run")) == tmp_path / "elsewhere"
    assert type(open_board("tb", tmp_path, is_main=False, resumed_step=None)).__name__ == "NullBoard"
    assert not (tmp_path / "tb").exists()  # only rank 0 writes


def test_unwritable_dir_is_one_line_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    from attent_scale.errors import UserError

    with pytest.raises(UserError, match=r"metrics\.tensorboard_dir.*file"):
        open_board(str(tmp_path / "file" / "tb"), tmp_path, is_main=True, resumed_step=None)
