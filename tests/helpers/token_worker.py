"""Token selection (teacher.unit token) in an engine's step on real ranks: the same global micro batches on 1
rank (engine local) and on 2 (fsdp, deepspeed); each rank writes the tokens it kept, its losses and the
probe scores after the steps. argv: engine name, out dir (holding `ref/`, the frozen reference model, and
`learner/`, the learner's initial weights: every engine starts from the same ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from engine_worker import VOCAB, main, make_batch, tiny_config

STEPS = 3
ROWS = 8  # global rows per step: 2 micro batches of 4 on one rank, of 2 per rank on two
STRATEGIES = ("random", "hard")


def rank_rows(rank: int, world: int) -> list[int]:
    """This rank's rows of the global batch such that global micro batch i (rows 4i..4i+3) is split over
    the ranks: rank r holds rows 4i + (4/world)r .. of it."""
    per = 4 // world
    return [4 * i + per * rank + j for i in range(2) for j in range(per)]


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Step `step`'s 8 rows with padding (row 0 after 20 tokens, row 1 no target) and a prompt on row 3."""
    b = make_batch(ROWS, seed=10 + step)
    b["labels"][3, :6] = -100
    return b


class Recording:
    """Wraps the run's TokenStep: every micro batch's kept tokens as (sample id, position) pairs."""

    def __init__(self, tokens: Any) -> None:
        self.tokens, self.kept = tokens, []
        inner = tokens.weights

        def weights(ids: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor,
                    learner: torch.Tensor) -> torch.Tensor:
            w = inner(ids, input_ids, targets, learner)
            rows, pos = torch.nonzero(w.cpu() > 0, as_tuple=True)
            self.kept.append(sorted([int(ids[r]), int(p)] for r, p in zip(rows, pos, strict=True)))
            return w

        tokens.weights = weights


def run(engine_name: str, out: Path) -> dict[str, Any]:
    from attent_scale.config import TeacherConfig, config_from_dict
    from attent_scale.dist import group_size
    from attent_scale.engines import build_engine
    from attent_scale.engines.reference import open_token_reference
    from attent_scale.teacher.token_step import TokenStep

    world_guess = 1 if engine_name == "local" else 2
    raw = tiny_config(engine_name, micro_batch_size=4 // world_guess, grad_accum_steps=2, warmup_steps=0)
    raw["model"]["init_from"] = str(out / "learner")
    cfg = config_from_dict(raw)
    engine = build_engine(cfg, vocab_size=VOCAB)
    world = group_size()
    res: dict[str, Any] = {"rank": engine.rank, "world_size": world}
    for strategy in STRATEGIES:
        tcfg = TeacherConfig(unit="token", strategy=strategy, token_ratio=0.6,
                             token_reference=str(out / "ref") if strategy == "hard" else None)
        tokens = TokenStep(tcfg, seed=0, world=world, group=None)
        if strategy == "hard":
            tokens.reference = open_token_reference(str(out / "ref"), device=engine.device,
                                                    mesh=getattr(engine, "mesh", None))
            res["reference_sharded"] = bool(getattr(tokens.reference, "sharded", False))
            ref_params = [p for p in tokens.reference.model.parameters()]
            res["reference_whole"] = all(not hasattr(p, "ds_tensor") for p in ref_params)
        rec = Recording(tokens)
        losses = []
        for step in range(STEPS):
            b = global_batch(step)
            mine = rank_rows(engine.rank, world)
            batch = {k: v[mine] for k, v in b.items()}
            losses.append(engine.train_step(batch, tokens=tokens).loss)
        res[strategy] = {"kept": rec.kept, "losses": losses, "share": tokens.share,
                         "kept_tokens": tokens.kept_tokens, "target_tokens": tokens.target_tokens}
        res[f"score_after_{strategy}"] = engine.score(make_batch(8, seed=99)).tolist()
    return res


if __name__ == "__main__":
    main(run)
    from attent_scale.cli import exit_process

    exit_process(0, group_used=True)
