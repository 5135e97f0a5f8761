"""The stdlib docstring instruction pairs (read from sources without importing, filtered, deduplicated,
deterministic) and the SmolLM2 demo's cheap checks: its config and its argument errors. The demo's runs
are in test_pretrained.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attent_scale.data.instructions import docstring_pairs, first_paragraph, write_instructions
from attent_scale.errors import UserError

FAKE_LIB = {
    "good.py": '''
def area(w, h=1):
    """Return the area of a rectangle.

    Longer explanation that is not part of the answer."""
class Box:
    def open(self, force=False):
        """Open the box, even when it is stuck."""
    def _hidden(self):
        """Private methods are not asked about."""
def twin():
    """Return the area of a rectangle."""
def sig():
    """sig(x) -> int"""
raise SystemExit("importing this module would stop the interpreter")
''',
    "_private.py": 'def f():\n    """Private modules are skipped entirely."""\n',
    "test/test_good.py": 'def test_x():\n    """Tests are not library code at all."""\n',
    "pkg/__init__.py": 'def hello(name):\n    """Greet someone by their given name."""\n',
    "broken.py": "def (:\n",
}


def _fake_lib(root: Path) -> Path:
    for name, text in FAKE_LIB.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_pairs_from_sources_filtered_and_deduplicated(tmp_path: Path) -> None:
    pairs = docstring_pairs(_fake_lib(tmp_path))
    by_source = {p["source"]: p for p in pairs}
    # twin repeats area's docstring: one of them only; sig's C-style line, private and test code: none
    assert set(by_source) == {"good.area", "good.Box.open", "pkg.hello"}
    assert by_source["good.area"] == {"prompt": "Write the docstring of `good.area(w, h=1)`.",
                                      "response": "Return the area of a rectangle.", "source": "good.area"}
    assert by_source["good.Box.open"]["prompt"] == (
        "Write the docstring of `good.Box.open(self, force=False)`.")


def test_empty_library_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"{tmp_path}: no documented public functions"):
        docstring_pairs(tmp_path)


def test_first_paragraph_joins_lines() -> None:
    assert first_paragraph("  Do a\n   thing well.\n\nMore.") == "Do a thing well."


def test_stdlib_pairs_deterministic_unique_and_written(tmp_path: Path) -> None:
    pairs = docstring_pairs()
    assert len(pairs) > 1000  # ~2,500 on CPython 3.11
    assert len({p["prompt"] for p in pairs}) == len({p["response"] for p in pairs}) == len(pairs)
    assert all(p["prompt"].startswith("Write the docstring of `") for p in pairs)
    assert docstring_pairs()[:50] == pairs[:50]
    n = write_instructions(tmp_path / "i.jsonl", 300)
    rows = [json.loads(line) for line in (tmp_path / "i.jsonl").read_text().splitlines()]
    assert n == len(rows) == 300 and rows == pairs[:300]
    assert len({r["source"].split(".")[0] for r in rows}) > 50  # a spread over the library


@pytest.mark.parametrize(("args", "first"), [
    (["--examples", "50"], "--examples: only with --model smollm2"),
    (["--model", "smollm2", "--examples", "5"], "--examples 5: must be at least 8"),
    (["--model", "smollm2", "--epochs", "0"], "--epochs 0: must be at least 1"),
])
def test_demo_bad_arguments_are_one_line_errors(args: list[str], first: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from attent_scale import cli

    assert cli.main(["demo", "--out", str(tmp_path / "demo"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"attent-scale: error: {first}"), err
    assert not (tmp_path / "demo").exists()  # refused before anything was built


def test_demo_smollm2_config_is_valid() -> None:
    from attent_scale.config import load_config
    from attent_scale.demo import SMOL_CONFIG

    cfg = load_config(SMOL_CONFIG, [])
    assert cfg.model.lora.enabled and cfg.teacher.mode == "ledger" and cfg.teacher.warmup_epochs == 1
