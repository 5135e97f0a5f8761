"""Docs never drift: every block marked `<!-- runnable -->` in README.md and docs/ runs, and links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import procs
import pytest

REPO = Path(__file__).resolve().parents[2]
MARK = "<!-- runnable -->"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PY_END = "END_OF_PYTHON_BLOCK"  # the heredoc delimiter a ```python block runs inside
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, bash command) of each ```bash block right after a MARK line; a ```python block's
    command writes its body to a script and runs it with `python`; a stray MARK is an error."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        if i + 1 >= len(lines) or lines[i + 1].strip() not in ("```bash", "```sh", "```python"):
            raise AssertionError(f"{path.name}:{i + 1}: {MARK} must be followed by a ```bash or ```python "
                                 "block")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise AssertionError(f"{path.name}:{i + 2}: unterminated code block")
        body = "\n".join(lines[i + 2 : end])
        if lines[i + 1].strip() == "```python":
            script = f"{path.stem}_block_{i + 2}.py"  # a file, as a user runs it (spawn re-imports it)
            body = f"cat > {script} <<'{PY_END}'\n{body}\n{PY_END}\npython {script}"
        blocks.append((i + 2, body))
    return blocks


def _workspace(tmp: Path) -> dict[str, str]:
    """A scratch directory that looks like a checkout after `make setup`, with a small `my_texts/`."""
    for name in ("configs", "tools", "launch"):
        (tmp / name).symlink_to(REPO / name)
    bindir = Path(sys.executable).parent
    (tmp / ".venv" / "bin").mkdir(parents=True)
    (tmp / ".venv" / "bin" / "activate").write_text(f'export PATH="{bindir}:$PATH"\n')
    # "your own text": ~150 kB of the standard library's sources as 30 plain-text documents
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / f).read_text() for f in ("argparse.py", "textwrap.py", "fractions.py"))
    (tmp / "my_texts").mkdir()
    for i in range(30):
        (tmp / "my_texts" / f"doc{i:02d}.txt").write_text(text[i * 5000 : (i + 1) * 5000])
    return {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }


DOCS_WITH_BLOCKS = [p for p in DOCS if runnable_blocks(p)]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about a minute each on two quiet cores; far more on a shared, loaded machine
@pytest.mark.parametrize("doc", DOCS_WITH_BLOCKS, ids=[p.name for p in DOCS_WITH_BLOCKS])
def test_runnable_blocks_run(doc: Path, tmp_path: Path) -> None:
    """A file's runnable blocks run in order in one scratch checkout, each under `bash -euo pipefail`."""
    env = _workspace(tmp_path)
    for line, body in runnable_blocks(doc):
        proc = procs.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, (
            f"{doc.name}:{line}: block exited with {proc.returncode}\n{body}\n--- stdout\n"
            f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )


def test_every_relative_link_resolves() -> None:
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)}: link to missing {target}"


def test_readme_is_short_and_links_every_doc() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for doc in DOCS[1:]:
        if doc.name != "README.md":
            assert f"docs/{doc.name}" in readme, f"README does not link docs/{doc.name}"


def test_marker_must_precede_a_bash_block(tmp_path: Path) -> None:
    bad = tmp_path / "bad.md"
    bad.write_text(f"{MARK}\n\n```bash\necho hi\n```\n")
    with pytest.raises(AssertionError, match="must be followed"):
        runnable_blocks(bad)
    good = tmp_path / "good.md"
    good.write_text(f"text\n{MARK}\n```bash\necho hi\necho there\n```\n```bash\nnot run\n```\n")
    assert runnable_blocks(good) == [(3, "echo hi\necho there")]
    py = tmp_path / "py.md"
    py.write_text(f"{MARK}\n```python\nprint('hi')\n```\n")
    [(line, command)] = runnable_blocks(py)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert line == 2 and proc.returncode == 0 and proc.stdout == "hi\n"
