"""teacher.unit token in the engines' step on real ranks: 2 gloo ranks (FSDP2, DeepSpeed ZeRO-3) keep exactly
the tokens 1 rank (engine local) keeps for the same global micro batches (one threshold over all ranks, never
a per-rank cut), train the same (the loss is the mean over every kept token of the step), and never keep a
padding or prompt token; the frozen reference is sharded over FSDP2's mesh and whole under ZeRO-3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import token_worker
from engine_worker import VOCAB, launch, tiny_config
from token_worker import STEPS, STRATEGIES, global_batch, rank_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny frozen reference model (`ref/`) and the learner's initial weights (`learner/`), so that every
    engine (ZeRO-3's partitioned init included) starts from the same model."""
    from attent_scale.config import ModelConfig
    from attent_scale.models import build_model

    out = tmp_path_factory.mktemp("tokref")
    shape = ModelConfig(config=tiny_config()["model"]["config"])
    build_model(shape, VOCAB, seed=7).save_pretrained(out / "ref")
    build_model(shape, VOCAB, seed=0).save_pretrained(out / "learner")
    return out


def _launch(engine: str, world: int, tmp: Path, models: Path) -> list[dict[str, Any]]:
    out = tmp / engine
    out.mkdir(parents=True)
    for name in ("ref", "learner"):
        (out / name).symlink_to(models / name)
    return launch(engine, out, world_size=world, script=token_worker.__file__)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory, ref_dir: Path) -> dict[str, Any]:
    return _launch("local", 1, tmp_path_factory.mktemp("tok1"), ref_dir)[0]


def _invalid(step: int) -> set[tuple[int, int]]:
    b = global_batch(step)
    rows, pos = (b["labels"] == -100).nonzero(as_tuple=True)
    return {(int(b["ids"][r]), int(p)) for r, p in zip(rows, pos, strict=True)}


def test_one_rank_keeps_the_share_and_never_a_padding_or_prompt_token(one_rank: dict[str, Any]) -> None:
    for strategy in STRATEGIES:
        res = one_rank[strategy]
        assert len(res["kept"]) == 2 * STEPS  # one entry per micro batch
        for i, kept in enumerate(res["kept"]):
            assert kept and not {tuple(k) for k in kept} & _invalid(i // 2), (strategy, i)
        assert res["share"] == pytest.approx(0.6, abs=0.01) and res["kept_tokens"] > 0
    # the two strategies keep different tokens (hard: by learnability against the reference)
    assert one_rank["random"]["kept"] != one_rank["hard"]["kept"]
    assert rank_rows(0, 1) == list(range(8))


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_two_ranks_keep_the_tokens_one_rank_keeps(tmp_path: Path, ref_dir: Path, one_rank: dict[str, Any],
                                                 engine: str) -> None:
    ranks = _launch(engine, 2, tmp_path, ref_dir)
    assert [r["world_size"] for r in ranks] == [2, 2]
    if engine == "fsdp":
        assert all(r["reference_sharded"] for r in ranks)  # fully_shard'ed over the learner's mesh
    else:
        assert all(r["reference_whole"] for r in ranks)  # not partitioned by the learner's ZeRO-3 config
    for strategy in STRATEGIES:
        one = one_rank[strategy]
        for i, kept in enumerate(one["kept"]):
            merged = sorted(k for r in ranks for k in r[strategy]["kept"][i])
            assert merged == kept, (strategy, i)
        for r in ranks:  # global counts on every rank
            assert (r[strategy]["kept_tokens"], r[strategy]["target_tokens"]) == (one["kept_tokens"],
                                                                                  one["target_tokens"])
        # each rank's loss is its share of the mean over every kept token: their mean is one rank's loss
        mean = [sum(r[strategy]["losses"][s] for r in ranks) / 2 for s in range(STEPS)]
        assert mean == pytest.approx(one["losses"], rel=1e-4, abs=1e-5), strategy
        for r in ranks:
            assert r[f"score_after_{strategy}"] == pytest.approx(one_rank[f"score_after_{strategy}"],
                                                                 rel=1e-4, abs=1e-5), strategy
