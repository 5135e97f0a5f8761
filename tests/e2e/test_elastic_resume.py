"""Elastic resume with real processes (torchrun, gloo, CPU): a checkpoint written on W ranks resumes on
W' != W; the resumed epoch trains each id it still owes once, and the selection stays that of the run
that never stopped (the ledger is re-blocked; the selection does not depend on the world size)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import procs
import pytest
import yaml
from train_runner import REPO, check, read_lines, run_train, tiny_run_config

from attent_scale import launcher
from attent_scale.data import Manifest

pytestmark = pytest.mark.slow

TEACHER = {"mode": "ledger", "strategy": "hard", "warmup_epochs": 1, "total_cycles": 2,
           "initial_ratio": 0.5, "final_ratio": 0.5}


def _run(cfg: dict, nproc: int, ids_dir: Path, env: dict[str, str] | None = None,
         timeout: float = 420) -> subprocess.CompletedProcess:
    """torchrun `nproc` ranks of tests/helpers/ids_trainer.py (the trainer, recording each step's ids)."""
    run_dir = Path(cfg["run_dir"])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    ids_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    trainer = Path(__file__).parents[1].joinpath("helpers", "ids_trainer.py")
    cmd = [*launcher.command((str(trainer), "train"), nproc, torchrun=True), "--config", str(cfg_path)]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "ATTENT_IDS_DIR": str(ids_dir), **(env or {})}
    return procs.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def _trained(ids_dir: Path) -> list[dict]:
    return [row for f in sorted(ids_dir.glob("ids-*.jsonl")) for row in read_lines(f)]


def _config(run_dir: Path, shards: Path) -> dict:
    # 4 ranks x 8 rows = 32 per step, as 2 x 16: the job's batch stays the same when W changes
    cfg = tiny_run_config(run_dir, shards, "fsdp", teacher=TEACHER,
                          train={"max_steps": 200, "max_epochs": 3, "stop_check_every": 1, "log_every": 1},
                          eval={"every_steps": 0, "max_batches": 1})
    return cfg


def _set_batch(cfg: dict, world: int) -> dict:
    cfg["train"]["micro_batch_size"] = 32 // world
    return cfg


@pytest.mark.parametrize("old,new", [(2, 3), (4, 2), (3, 4)])
def test_owed_ids_of_a_stopped_epoch_are_streamed_once_over_another_world_size(tiny_shards, old, new):
    """The ids the old ranks still owe (their saved positions replayed), streamed over `new` padded ranks:
    every owed id once, nothing else, and every new rank yields the same number of batches."""
    from attent_scale.data import ShardStream
    from attent_scale.teacher import Selection

    n = Manifest.load(tiny_shards).num_samples("train")
    kw = {"seed": 3, "epoch": 1, "shuffle_buffer": 16}
    owed, trained = [], []
    for r in range(old):
        stream = ShardStream(tiny_shards, "train", rank=r, world_size=old, batch_size=8, **kw)
        it = iter(stream)
        trained += [i for _ in range(3) for i in next(it)["ids"].tolist()]
        state = stream.state_dict()
        again = ShardStream(tiny_shards, "train", rank=r, world_size=old, batch_size=8, **kw)
        again.load_state_dict(state)
        owed += again.remaining_ids().tolist()
        assert sorted(owed[-len(again.remaining_ids()):] + trained[-24:]) == again.epoch_ids().tolist()
    assert not set(owed) & set(trained)
    got, lengths = [], []
    for r in range(new):
        stream = ShardStream(tiny_shards, "train", rank=r, world_size=new, batch_size=5,
                             selection=Selection.from_ids(owed, n), pad=True, **kw)
        batches = list(stream)
        lengths.append(len(batches))
        got += [i for b in batches for i in b["ids"].tolist() if i >= 0]
        assert stream.faults == 0 and stream.dropped == 0
    assert sorted(got) == sorted(owed) and len(set(lengths)) == 1


def _epoch_ids(rows: list[dict], epoch: int) -> list[int]:
    return [i for r in rows if r["epoch"] == epoch for i in r["ids"]]


def _resume_line(proc: subprocess.CompletedProcess) -> str:
    return next(x for x in proc.stderr.splitlines() if "attent-scale: resumed from" in x)


@pytest.mark.timeout(1500)
def test_fsdp_resumes_on_another_world_size(tmp_path, tiny_shards):
    """4 ranks stop at the end of epoch 0 -> 2 ranks make the selection the 4-rank run makes, stop inside
    epoch 1 -> 4 ranks train what epoch 1 still owes, stop inside epoch 2 -> 2 ranks finish it."""
    straight = _config(tmp_path / "straight", tiny_shards)
    check(_run(_set_batch(straight, 4), 4, tmp_path / "ids-straight"))
    want = {r["epoch"]: r["sha256"] for r in read_lines(tmp_path / "straight" / "selection.jsonl")}
    steps_epoch0 = max(r["step"] for r in _trained(tmp_path / "ids-straight") if r["epoch"] == 0)

    cfg = _config(tmp_path / "broken", tiny_shards)
    ids = tmp_path / "ids"
    legs = [(4, steps_epoch0), (2, steps_epoch0 + 5), (4, steps_epoch0 + 20), (2, None)]
    procs = []
    for world, stop in legs:
        env = {"ATTENT_STOP_AFTER_STEP": str(stop)} if stop is not None else {}
        proc = _run(_set_batch(cfg, world), world, ids, env=env)
        procs.append(proc)
        if stop is None:
            check(proc)
        else:
            marker = json.loads((tmp_path / "broken" / "PREEMPTED").read_text())
            assert marker["step"] == stop, proc.stderr[-3000:]
    # the selection the 2 ranks make from the 4 ranks' re-blocked ledger is the 4-rank run's
    got = {r["epoch"]: r["sha256"] for r in read_lines(tmp_path / "broken" / "selection.jsonl")}
    assert got[1] == want[1]
    assert "written on 4 ranks, continued on 2" in _resume_line(procs[1])
    assert "written on 2 ranks, continued on 4" in _resume_line(procs[2])
    # every id an interrupted epoch still owed is trained once: nothing twice, nothing lost but the
    # epoch plan's equalisation remainder (< world size), which summary.json counts
    rows = _trained(ids)
    summary = json.loads((tmp_path / "broken" / "summary.json").read_text())
    selected = {r["epoch"]: r["n_selected"] for r in read_lines(tmp_path / "broken" / "selection.jsonl")}
    n = summary["samples_trained"]
    for epoch in (1, 2):
        trained = _epoch_ids(rows, epoch)
        assert len(trained) == len(set(trained)), epoch
        # the drop of the epoch's own plan (W=2 for epoch 1, 4 for epoch 2) only: the resume drops none
        assert len(trained) == selected[epoch] - selected[epoch] % (2 if epoch == 1 else 4), epoch
    epoch0 = _epoch_ids(rows, 0)
    assert len(epoch0) == len(set(epoch0))
    assert n == sum(len(r["ids"]) for r in rows)
    n_train = Manifest.load(tiny_shards).num_samples("train")
    assert summary["dropped_samples"] == n_train + selected[1] + selected[2] - n
    assert summary["steps"] == max(r["step"] for r in rows)


@pytest.mark.timeout(600)
def test_zero3_checkpoint_on_another_world_size_is_one_line_naming_the_conversion(tmp_path, tiny_shards):
    cfg = tiny_run_config(tmp_path / "run", tiny_shards, "deepspeed", train={"max_steps": 2},
                          eval={"every_steps": 0, "max_batches": 1}, checkpoint={"every_steps": 2})
    check(run_train(cfg, nproc=1))
    cfg["train"]["max_steps"] = 4
    proc = run_train(cfg, nproc=2)
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("attent-scale: error:")]
    assert errors and all(x == errors[0] for x in errors), proc.stderr[-3000:]
    assert "written by 1 ranks, this job has 2" in errors[0] and "ds_to_universal" in errors[0], errors[0]
    # torchrun prints its own ChildFailedError traceback; no frame of ours may appear
    assert "attent_scale/" not in "".join(x for x in proc.stderr.splitlines() if 'File "' in x), proc.stderr


@pytest.mark.timeout(600)
def test_finished_run_resumed_with_a_larger_max_steps_goes_on_where_its_stream_stood(tmp_path, tiny_shards):
    """issue 30: a run that ended at train.max_steps mid-epoch, rerun with a larger max_steps, trains the
    rest of that epoch, not the epoch again from its start (its final checkpoint keeps the stream
    position)."""
    ids = tmp_path / "ids"
    cfg = tiny_run_config(tmp_path / "run", tiny_shards, teacher={"mode": "none"},
                          train={"max_steps": 6}, eval={"every_steps": 0, "max_batches": 1},
                          checkpoint={"every_steps": 100})
    check(_run(cfg, 1, ids))
    assert (tmp_path / "run" / "checkpoints" / "step-00000006" / "COMPLETE").exists()  # the final one
    n_train = Manifest.load(tiny_shards).num_samples("train")
    per_epoch = -(-n_train // 16)
    cfg["train"]["max_steps"] = per_epoch + 3  # the rest of epoch 0 and 3 steps of epoch 1
    again = _run(cfg, 1, ids)
    check(again)
    assert "(step 6, 96 samples trained, epoch 0 after 6 of its batches" in _resume_line(again), again.stderr
    rows = _trained(ids)
    epoch0 = _epoch_ids(rows, 0)
    assert len(epoch0) == len(set(epoch0)) == n_train  # every id of the epoch once, none twice
    assert [r["step"] for r in rows] == list(range(1, per_epoch + 4))
    assert {r["epoch"] for r in rows if r["step"] > per_epoch} == {1}
