"""The command line a newcomer meets first: --version, train --help, the bench's per-arm progress relay."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import procs

from attent_scale import __version__
from attent_scale.bench import run_with_bar
from attent_scale.config import RunConfig

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return procs.run([sys.executable, "-m", "attent_scale", *args], cwd=REPO, capture_output=True,
                     text=True, timeout=300)


def test_version() -> None:
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"attent-scale {__version__}"


def test_train_help_lists_every_config_section_and_key() -> None:
    proc = _cli("train", "--help")
    assert proc.returncode == 0, proc.stderr
    epilog = proc.stdout.split("config sections", 1)[1]
    for section in ("data", "model", "engine", "teacher", "train", "eval", "checkpoint", "metrics",
                    "reference"):
        assert f"\n  {section} " in epilog
    assert "run_dir, seed" in epilog
    words = epilog.replace(",", " ").split()
    for key in ("rescore", "topk_method", "lora.target_modules", "max_epochs", "linger_seconds"):
        assert key in words
    assert len(RunConfig.__dataclass_fields__) == 11  # a new section must show up above


FAKE_TRAINER = textwrap.dedent("""
    import sys
    print("stdout line")
    sys.stderr.write("a warning line\\n")
    for i in range(3):
        sys.stderr.write(f"\\rtrain:  {i}/3 [loss=4.{i}]")
        sys.stderr.flush()
    sys.stderr.write("\\rtrain: 100% 3/3 [loss=3.9]\\n")
    sys.stderr.write("after the bar\\n")
    sys.exit(int(sys.argv[1]))
""")


def test_run_with_bar_relays_the_bar_and_logs_everything_else(tmp_path: Path, capsys) -> None:
    script = tmp_path / "fake.py"
    script.write_text(FAKE_TRAINER)
    log = tmp_path / "train.log"
    assert run_with_bar([sys.executable, str(script), "0"], log, "hard seed 1") == 0
    err = capsys.readouterr().err
    # not a terminal: the bar's last frame once, under the arm's label
    assert err.strip() == "hard seed 1: 100% 3/3 [loss=3.9]"
    text = log.read_text()
    assert text.startswith("$ ") and str(script) in text.splitlines()[0]
    for line in ("stdout line", "a warning line", "after the bar"):
        assert line in text
    assert "train:" not in text and "loss=4.1" not in text


def test_run_with_bar_returns_the_exit_code(tmp_path: Path, capsys) -> None:
    script = tmp_path / "fake.py"
    script.write_text(FAKE_TRAINER)
    assert run_with_bar([sys.executable, str(script), "3"], tmp_path / "log", "x") == 3
