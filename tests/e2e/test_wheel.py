"""The wheel as a user gets it: built offline, installed into a fresh venv, run outside the checkout.

The fresh venv takes attent-scale from the wheel and nothing else from this checkout: its dependencies
(torch, transformers, ...) come from this test's own environment through a .pth line (a path line only:
that environment's own .pth files, among them the editable install of this checkout, are not read), and
every command runs in an empty folder with no PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["configs/demo.yaml", "configs/demo_smollm2.yaml", "configs/deepspeed_zero3.json",
           "launch/slurm_torchrun.sbatch", "launch/slurm_srun.sbatch", "launch/slurm_deepspeed.sbatch",
           "launch/local.sh", "ops/grafana/attent-scale.json", "ops/prometheus/prometheus.yml"]


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600,
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}: {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built offline (no index, no build isolation: this environment's setuptools) from a copy
    of the source tree, so the build leaves nothing in the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".ruff_cache"))
    out = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(out), str(src)], tmp, {**os.environ, "PIP_NO_INPUT": "1"})
    (found,) = out.glob("attent_scale-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh venv with the wheel installed; returns its bin folder and the environment to run it in."""
    tmp = tmp_path_factory.mktemp("venv")
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    (site / "_attent_test_deps.pth").write_text("".join(f"{d}\n" for d in dict.fromkeys(deps)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{env_dir / 'bin'}:{env['PATH']}", PIP_NO_INPUT="1", DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp, env)
    return env_dir / "bin", env


def test_the_wheel_carries_the_configs_scripts_dashboard_and_license(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for rel in SHIPPED:
        assert f"attent_scale/assets/{rel}" in names, rel
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert not any(n.startswith(("tests/", "tools/", "docs/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    # the base install is what every path needs; the optional packages come with extras
    base = [line for line in meta.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    for optional in ("deepspeed", "matplotlib", "pyarrow", "tensorboard", "aiohttp", "fsspec", "datasets"):
        assert not any(f" {optional}" in line.split(";")[0] for line in base), (optional, base)
    for extra in ("deepspeed", "hf", "s3", "gcs", "http", "parquet", "plot", "tensorboard", "smollm2",
                  "wandb"):
        assert f"Provides-Extra: {extra}" in meta, extra


def test_installed_wheel_inits_trains_a_packaged_config_and_starts_the_demo_outside_the_checkout(
        venv: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = venv
    work = tmp_path / "empty"
    work.mkdir()
    where = _run([str(bin_dir / "python"), "-c", "import attent_scale; print(attent_scale.__file__)"],
                 work, env)
    assert Path(where.stdout.strip()).is_relative_to(bin_dir.parent), where.stdout  # the wheel's copy
    cli = str(bin_dir / "attent-scale")
    help_text = _run([cli, "train", "--help"], work, env).stdout
    assert "see configs/" not in help_text and "packaged" in help_text

    # init: the starter files, scripts executable; a second init refuses to overwrite them
    _run([cli, "init", "starter"], work, env)
    for rel in SHIPPED:
        assert (work / "starter" / rel).is_file(), rel
    assert os.access(work / "starter" / "launch" / "slurm_srun.sbatch", os.X_OK)
    again = subprocess.run([cli, "init", "starter"], cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    # the demo: shards from the embedded corpus, then its first arm trains; stopped after its first steps
    demo = subprocess.Popen([cli, "demo"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = work / "runs" / "demo" / "uniform" / "seed-0" / "metrics.jsonl"
    deadline = time.monotonic() + 900
    try:
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert demo.poll() is None, demo.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the demo trained no step in 900 s"
            time.sleep(1)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        out = demo.communicate(timeout=60)[0]
    assert "shards: runs/demo/shards" in out and "[1/2] uniform" in out, out[-3000:]
    assert json.loads(metrics.read_text().splitlines()[0])["step"] >= 1
    assert not (work / "configs").exists()  # nothing came from a checkout's configs/ folder

    # the packaged config by name, on the demo's shards; engine.name=deepspeed needs no JSON path
    _run([cli, "train", "--config", "demo", "--set", "data.dir=runs/demo/shards", "--set", "run_dir=runs/try",
          "--set", "train.max_steps=2", "--set", "eval.every_steps=2", "--set", "eval.max_batches=1",
          "--set", "checkpoint.export=false"], work, env)
    assert json.loads((work / "runs" / "try" / "summary.json").read_text())["steps"] == 2
    shown = _run([str(bin_dir / "python"), "-m", "attent_scale.ops.run_dir", "demo", "--set", "run_dir=x/y"],
                 work, env)
    assert shown.stdout.strip() == "x/y"
