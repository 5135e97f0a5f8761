"""The Python API: `attent_scale` exports its entry points lazily, and `UserError` is a ValueError."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import procs
import pytest

import attent_scale
from attent_scale.errors import UserError

REPO = Path(__file__).resolve().parents[2]
EXPORTS = ("train", "load_config", "RunConfig", "Teacher", "ShardStream", "AttentTrainer", "AttentCallback",
           "UserError")


def _python(code: str) -> str:
    proc = procs.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_importing_the_package_or_its_config_api_loads_no_torch() -> None:
    out = _python("import sys, attent_scale\n"
                  "print('torch' in sys.modules)\n"
                  "cfg = attent_scale.load_config(None, ['train.max_steps=3'])\n"
                  "print('torch' in sys.modules, type(cfg).__name__, cfg.train.max_steps)")
    assert out.split() == ["False", "False", "RunConfig", "3"]


def test_every_export_is_the_object_its_module_defines() -> None:
    from attent_scale.config import RunConfig, load_config
    from attent_scale.data import ShardStream
    from attent_scale.integrations.hf import AttentTrainer
    from attent_scale.integrations.lightning import AttentCallback
    from attent_scale.teacher import Teacher

    expected = {"load_config": load_config, "RunConfig": RunConfig, "Teacher": Teacher,
                "ShardStream": ShardStream, "AttentTrainer": AttentTrainer, "AttentCallback": AttentCallback,
                "UserError": UserError}
    for name, obj in expected.items():
        assert getattr(attent_scale, name) is obj, name
    assert set(EXPORTS) <= set(attent_scale.__all__) and set(EXPORTS) <= set(dir(attent_scale))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        attent_scale.nope  # noqa: B018


def test_train_is_callable_however_it_was_imported() -> None:
    # the submodule `attent_scale.train` replaces a package attribute of that name on its first import
    # (as the CLI does it): the export must be callable either way, and stay the module the CLI uses
    code = ("import {first}\n"
            "from attent_scale import train\n"
            "import attent_scale, inspect\n"
            "assert attent_scale.train is train and callable(train) and hasattr(train, 'add_parser')\n"
            "print(inspect.signature(train))")
    for first in ("attent_scale", "attent_scale.train", "attent_scale.cli"):
        assert _python(code.format(first=first)).strip() == "(cfg: 'RunConfig') -> 'int'", first


def test_train_called_as_the_export_runs_the_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    import attent_scale.train as module

    seen = []
    monkeypatch.setattr(module, "train", lambda cfg: seen.append(cfg) or 7)
    assert attent_scale.train("cfg") == 7 and seen == ["cfg"]


def test_user_error_is_a_value_error_and_the_cli_still_prints_one_line(tmp_path: Path) -> None:
    assert issubclass(UserError, ValueError)
    with pytest.raises(ValueError, match="config key 'teacher.stratgy'"):
        attent_scale.load_config(None, ["teacher.stratgy=hard"])
    cmd = [sys.executable, "-m", "attent_scale", "train", "--config", str(tmp_path / "no.yaml")]
    proc = procs.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# Code that catches ValueError around a UserError must let it through with its own message.

def test_a_bad_part_manifest_keeps_its_own_message(tmp_path: Path) -> None:
    from attent_scale.data.builder import PART_NAME, merge_parts

    part = tmp_path / "part0"
    part.mkdir()
    (part / PART_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError) as err:
        merge_parts([part], tmp_path / "out")
    assert "not a part manifest" in str(err.value) and "invalid part" not in str(err.value)


def test_a_missing_sample_while_scoring_keeps_its_own_message(tmp_path: Path, tiny_shards: Path) -> None:
    from attent_scale.data import Manifest
    from attent_scale.score import _windows

    data = tmp_path / "shards"
    shutil.copytree(tiny_shards, data)
    manifest = Manifest.load(data)
    first = manifest.shards("train")[0]
    path = manifest.shard_path(first)
    with tarfile.open(path) as tar:  # the shard without its second sample
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    second = members[1][0].name.split(".", 1)[0]
    with tarfile.open(path, "w") as tar:
        for member, payload in members:
            if member.name.split(".", 1)[0] != second:
                tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(UserError) as err:
        list(_windows(manifest, "train", first.first_id, first.last_id))
    assert f"sample {first.first_id + 1} missing" in str(err.value), err.value
    assert "unreadable shard" not in str(err.value)


def test_train_twice_in_one_process_on_one_run_dir(tmp_path: Path, tiny_shards: Path) -> None:
    """The Python API: a second train(cfg) on the same run_dir (a resume) takes the run lock the first one
    released, and the caller's cfg is not changed by the trainer's epoch-budget plan."""
    from train_runner import tiny_run_config

    cfg = tiny_run_config(tmp_path / "run", tiny_shards, teacher={"mode": "none"},
                          train={"max_epochs": 1, "max_steps": 1000},
                          checkpoint={"every_steps": 4, "export": False})
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    script = (
        "import sys, attent_scale\n"
        f"cfg = attent_scale.load_config({str(tmp_path / 'cfg.yaml')!r}, [])\n"
        "codes = [attent_scale.train(cfg), attent_scale.train(cfg)]\n"
        "print(codes, cfg.train.max_steps)\n"
    )
    proc = procs.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[0, 0] 1000", proc.stdout
    assert "resumed from" in proc.stderr
