"""model.init_from names a Hub id (org/name) that is resolved from the local Hugging Face cache only, as
with HF_HUB_OFFLINE=1: a tiny model saved into a temporary HF_HUB_CACHE layout stands in for the Hub."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_runner import TINY_MODEL, check, read_lines, run_train, tiny_run_config

from attent_scale.config import ModelConfig
from attent_scale.errors import UserError
from attent_scale.models import init_source

REPO_ID = "tiny-org/tiny-gpt"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HUB_CACHE with REPO_ID at COMMIT (refs/main -> snapshots/COMMIT), as `hf download` leaves it."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    cache = tmp_path_factory.mktemp("hub")
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(**{**TINY_MODEL, "vocab_size": 512}))
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def test_a_hub_id_resolves_to_its_cached_snapshot_and_a_missing_one_is_one_line(
        hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, key = init_source(ModelConfig(init_from=REPO_ID))  # type: ignore[misc]
    assert key == "model.init_from" and path == hub_cache / f"models--tiny-org--tiny-gpt/snapshots/{COMMIT}"
    with pytest.raises(UserError, match=r"config key 'model.init_from': 'tiny-org/absent'.*Hugging Face "
                       r"cache .*hf download tiny-org/absent") as err:
        init_source(ModelConfig(init_from="tiny-org/absent"))
    assert "\n" not in str(err.value)
    # a local directory of that shape wins over the cache
    local = Path("tiny-org")  # relative to the cwd: exists only while the test makes it
    monkeypatch.chdir(hub_cache)
    (hub_cache / local / "absent").mkdir(parents=True)
    assert init_source(ModelConfig(init_from="tiny-org/absent"))[0] == Path("tiny-org/absent")  # type: ignore[index]


@pytest.mark.slow
def test_training_starts_from_the_cached_model_without_the_network(hub_cache: Path, tiny_shards: Path,
                                                                   tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    runs = {}
    for name, source in (("by-id", REPO_ID), ("by-path", str(hub_cache / f"models--tiny-org--tiny-gpt/"
                                                                      f"snapshots/{COMMIT}"))):
        cfg = tiny_run_config(tmp_path / name, tiny_shards, train={"max_steps": 2},
                              eval={"every_steps": 2, "max_batches": 1}, checkpoint={"export": False},
                              teacher={"mode": "none"})
        cfg["model"] = {"init_from": source}
        check(run_train(cfg, env=env, timeout=600))
        runs[name] = [(r["step"], r["val_loss"]) for r in read_lines(tmp_path / name / "eval.jsonl")]
    assert runs["by-id"][0][0] == 0 and runs["by-id"] == runs["by-path"]  # the same weights at step 0
    # not in the cache: one line, exit 2
    cfg = tiny_run_config(tmp_path / "absent", tiny_shards, train={"max_steps": 2})
    cfg["model"] = {"init_from": "tiny-org/absent"}
    proc = run_train(cfg, env=env, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if "error" in x]
    assert "'model.init_from'" in line and "tiny-org/absent" in line, line
