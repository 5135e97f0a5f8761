"""The shipped files: found by name, copied out by `attent-scale init`, and one copy of each in a checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attent_scale import assets
from attent_scale.cli import main
from attent_scale.config import load_config
from attent_scale.errors import UserError
from attent_scale.init import shipped_files, write_starter

ROOT = Path(__file__).resolve().parents[2]


def test_a_bare_name_is_a_packaged_config_and_a_file_of_that_name_wins(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config("demo").model.config["n_layer"] == 2
    assert assets.resolve_config("demo") == assets.root() / "configs" / "demo.yaml"
    (tmp_path / "demo").write_text("seed: 7\n")  # a file here named like a packaged config
    assert load_config("demo").seed == 7
    with pytest.raises(UserError, match=r"config file nosuch: no such file, and no packaged config of that "
                       r"name \(packaged: .*demo.*\)"):
        load_config("nosuch")
    with pytest.raises(UserError, match="config file nosuch.yaml"):  # a file name is a file name
        load_config("nosuch.yaml")


def test_init_writes_every_shipped_file_and_never_overwrites_without_force(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rel = [str(p) for p in shipped_files()]
    for name in ("configs/demo.yaml", "configs/deepspeed_zero3.json", "launch/slurm_srun.sbatch",
                 "launch/local.sh", "ops/grafana/attent-scale.json", "ops/prometheus/prometheus.yml"):
        assert name in rel, name
    assert not any(r.endswith(".py") for r in rel)
    out = tmp_path / "starter"
    assert main(["init", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    for r in rel:
        assert (out / r).read_bytes() == (assets.root() / r).read_bytes(), r
    assert os.access(out / "launch" / "slurm_torchrun.sbatch", os.X_OK)
    (out / "configs" / "demo.yaml").write_text("mine\n")
    (out / "notes.txt").write_text("keep\n")
    assert main(["init", str(out)]) == 2  # a clash: one line, nothing written
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "configs" / "demo.yaml").read_text() == "mine\n"
    write_starter(out, force=True)
    assert (out / "configs" / "demo.yaml").read_bytes() == assets.path("configs", "demo.yaml").read_bytes()
    assert (out / "notes.txt").read_text() == "keep\n"  # what init did not write stays
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        write_starter(tmp_path / "afile")


def test_a_checkout_has_one_copy_of_each_shipped_file() -> None:
    # the top-level folders users and docs name are links into the package, not second copies
    for link, target in (("configs", "attent_scale/assets/configs"), ("launch", "attent_scale/assets/launch"),
                         ("tools/ops/grafana", "attent_scale/assets/ops/grafana"),
                         ("tools/ops/prometheus", "attent_scale/assets/ops/prometheus")):
        path = ROOT / link
        assert path.is_symlink() and path.resolve() == (ROOT / target).resolve(), link
