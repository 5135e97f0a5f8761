"""Steps/s and tokens/s of one engine on random tokens (run under torchrun for deepspeed/fsdp)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from attent_scale.config import config_from_dict
from attent_scale.engines import build_engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--engine", default="local", choices=["local", "deepspeed", "fsdp"])
    p.add_argument("--deepspeed-config", default="configs/deepspeed_zero3.json")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    engine_cfg: dict = {"name": a.engine}
    if a.engine == "deepspeed":
        engine_cfg["deepspeed_config"] = a.deepspeed_config
    cfg = config_from_dict(
        {
            "model": {
                "config": {
                    "model_type": "gpt2",
                    "n_layer": a.layers,
                    "n_embd": a.width,
                    "n_head": a.heads,
                    "n_positions": a.seq,
                }
            },
            "engine": engine_cfg,
            "train": {"micro_batch_size": a.micro_batch, "grad_accum_steps": a.grad_accum, "max_steps": 1000},
        }
    )
    engine = build_engine(cfg, vocab_size=a.vocab)
    rows = a.micro_batch * a.grad_accum
    g = torch.Generator().manual_seed(engine.rank)
    toks = torch.randint(0, a.vocab, (rows, a.seq + 1), generator=g)
    batch = {"ids": torch.arange(rows), "input_ids": toks[:, :-1].clone(), "labels": toks[:, 1:].clone()}
    for _ in range(a.warmup):
        engine.train_step(batch)
    start = time.perf_counter()
    for _ in range(a.steps):
        engine.train_step(batch)
    seconds = time.perf_counter() - start
    if engine.rank == 0:
        steps_s = a.steps / seconds
        print(
            json.dumps(
                {
                    "engine": a.engine,
                    "world_size": engine.world_size,
                    "threads": torch.get_num_threads(),
                    "steps_per_s": round(steps_s, 3),
                    "tokens_per_s": round(steps_s * rows * a.seq * engine.world_size, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
