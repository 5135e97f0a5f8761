"""Multi-process engine scenarios run as real ranks (env RANK/WORLD_SIZE/MASTER_PORT), gloo on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import procs
import torch

REPO = Path(__file__).resolve().parents[2]
VOCAB = 1000
SEQ = 32


def tiny_config(
    engine: str = "local", *, lora: bool = False, stage: int = 3, tied: bool = True, **train: Any
) -> dict[str, Any]:
    """Raw run config for a tiny GPT-2 (2 layers, width 32, vocab 1000, seq 32), dropout off."""
    model: dict[str, Any] = {
        "config": {
            "model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": SEQ,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": tied,
        }
    }
    if lora:
        model["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn", "c_proj"],
                         "export_merged": True}
    tr = {"micro_batch_size": 4, "grad_accum_steps": 1, "lr": 3e-3, "warmup_steps": 0, "max_steps": 50}
    tr.update(train)
    eng: dict[str, Any] = {"name": engine}
    if engine == "deepspeed":
        eng["deepspeed_config"] = str(REPO / "configs" / f"deepspeed_zero{stage}.json")
    return {"seed": 0, "model": model, "engine": eng, "train": tr}


def make_batch(rows: int, seed: int, *, pad_rows: bool = True) -> dict[str, torch.Tensor]:
    """Random tokens; row 0 padded after 20 tokens and row 1 with no target when `pad_rows`."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    labels = toks[:, 1:].clone()
    if pad_rows and rows >= 2:
        labels[0, 20:] = -100
        labels[1] = -100
    return {"ids": torch.arange(rows, dtype=torch.int64) + 1000 * seed, "input_ids": toks[:, :-1].clone(),
            "labels": labels}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HANG_S = float(os.environ.get("ATTENT_TEST_HANG_S", "100"))  # raise on a heavily shared machine


def launch(scenario: str, out: Path, world_size: int = 2, timeout: float = HANG_S + 20,
           script: str = __file__) -> list[dict]:
    """Run `scenario` on `world_size` ranks as separate processes (of `script`, this worker by default);
    return each rank's JSON result."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ranks = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        ranks.append((procs.start([sys.executable, script, scenario, str(out)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=timeout) for p, _ in ranks]
    finally:
        for p, log in ranks:
            if p.poll() is None:
                procs.kill(p.tag)
                p.wait()
            log.close()
    if any(codes):
        tail = (out / f"rank{codes.index(next(c for c in codes if c))}.log").read_text()[-3000:]
        raise AssertionError(f"scenario {scenario} exit codes {codes}:\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def _steps(engine: Any, batch: dict[str, torch.Tensor], n: int) -> list[float]:
    return [engine.train_step(batch).loss for _ in range(n)]


POISON = 5  # token whose embedding rank 0 sets to inf in the skip scenario


def _local_rows(engine: Any) -> tuple[torch.Tensor, int]:
    """This rank's storage of the token-embedding weight and the flat offset it starts at."""
    if hasattr(engine.model, "reshard"):  # FSDP2: the root stays unsharded after a forward
        engine.model.reshard()
    wte = engine.model.get_input_embeddings().weight
    if hasattr(wte, "ds_tensor"):
        if wte.data.numel() == wte.ds_numel:  # ZeRO-3 persistent (small) parameter: a full copy per rank
            return wte.data.view(-1), 0 if engine.rank == 0 else wte.ds_numel
        return wte.ds_tensor, engine.rank * wte.ds_tensor.numel()  # ZeRO-3: a flat slice
    local = wte.to_local() if hasattr(wte, "to_local") else wte.data  # FSDP2: rows sharded on dim 0
    return local.view(-1), engine.rank * local.numel()


def skip_scenario(engine: Any) -> dict[str, Any]:
    """A non-finite loss on rank 0 only: every rank must skip the same step and stay unchanged."""
    rank = engine.rank
    probe = make_batch(8, seed=99)
    batch = make_batch(8, seed=rank + 1)
    for b in (probe, batch):
        b["input_ids"][b["input_ids"] == POISON] = POISON + 1
    engine.train_step(batch)
    score_before, lr_before = engine.score(probe).tolist(), engine.current_lr()
    flat, offset = _local_rows(engine)
    width = engine.model.get_input_embeddings().embedding_dim
    lo, hi = POISON * width - offset, (POISON + 1) * width - offset
    owner = lo >= 0 and hi <= flat.numel()
    saved = flat[lo:hi].clone() if owner else None
    if owner:
        with torch.no_grad():
            flat[lo:hi] = float("inf")
    poisoned = {k: v.clone() for k, v in batch.items()}
    if rank == 0:
        poisoned["input_ids"][2, 3] = POISON
    res = engine.train_step(poisoned)
    flat, _ = _local_rows(engine)
    if owner:
        with torch.no_grad():
            flat[lo:hi] = saved
    lr_after = engine.current_lr()
    score_after = engine.score(probe).tolist()
    after = engine.train_step(batch)
    return {"rank": rank, "owner": owner, "skipped": res.skipped, "loss": res.loss,
            "lr_before": lr_before, "lr_after": lr_after, "score_before": score_before,
            "score_after": score_after, "next_skipped": after.skipped, "steps_done": engine.steps_done}


def accum_scenario(rank_seed: int) -> dict[str, Any]:
    """FSDP2: 1 x 8 rows and 2 x 4 rows per step must give the same training; count gradient reductions."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg

    from attent_scale.config import config_from_dict
    from attent_scale.engines import build_engine

    reduces = [0]
    original = pg.foreach_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        reduces[0] += 1
        return original(*args, **kwargs)

    pg.foreach_reduce = counting
    engines = [build_engine(config_from_dict(tiny_config("fsdp", micro_batch_size=mb, grad_accum_steps=ga)),
                            vocab_size=VOCAB) for mb, ga in ((8, 1), (4, 2))]
    batch = make_batch(8, seed=rank_seed)
    res: dict[str, Any] = {"rank": engines[0].rank}
    for i, engine in enumerate(engines):
        steps = []
        for _ in range(3):
            before_r, before_s = reduces[0], engine.host_syncs
            r = engine.train_step(batch)
            steps.append({"loss": r.loss, "grad_norm": r.grad_norm, "per_sample": r.per_sample.tolist(),
                          "reduces": reduces[0] - before_r, "host_syncs": engine.host_syncs - before_s})
        res[f"ga{i + 1}"] = steps
        res[f"score{i + 1}"] = engine.score(make_batch(8, seed=99)).tolist()
    res["fsdp_units"] = sum(1 for m in engines[0].model.modules() if hasattr(m, "set_requires_gradient_sync"))
    return res


def bf16_export_scenario(engine: Any, out: Path) -> dict[str, Any]:
    """ZeRO-3 under bf16: the export holds the fp32 master weights, not the bf16 module parameters."""
    from deepspeed.utils import safe_get_full_fp32_param

    batch = make_batch(8, seed=engine.rank + 1)
    for _ in range(3):
        engine.train_step(batch)
    masters = {}
    for name, param in engine.model.named_parameters():
        fp32 = safe_get_full_fp32_param(param)  # collective: every rank, same order
        masters[name] = fp32.float().cpu()
    module_dtype = str(next(engine.model.parameters()).dtype)
    engine.export(out / "export")
    res: dict[str, Any] = {"rank": engine.rank, "module_dtype": module_dtype}
    if engine.rank == 0:
        from safetensors.torch import load_file

        exported = load_file(str(out / "export" / "model" / "model.safetensors"))
        res["compared"] = sorted(k for k in masters if k in exported)
        res["equal"] = all(torch.equal(exported[k], masters[k]) for k in res["compared"])
        # the fp32 masters moved off the bf16 grid: an export of bf16 parameters could not hold them
        res["off_bf16_grid"] = sum(
            int((exported[k] != exported[k].bfloat16().float()).sum()) for k in res["compared"]
        )
        res["exported_dtypes"] = sorted({str(t.dtype) for t in exported.values()})
    return res


def weighted_batches(world: int = 2, rows: int = 8) -> list[dict[str, torch.Tensor]]:
    """One batch per rank with per-sample loss weights (no padding: equal token counts on every rank)."""
    out = []
    for rank in range(world):
        b = make_batch(rows, seed=rank + 1, pad_rows=False)
        b["weights"] = torch.tensor([0.0, 1.0, 2.5, 1.0, 1.5, 1.0, 0.5, 1.0][:rows]) + rank
        out.append(b)
    return out


def weighted_scenario(engine: Any) -> dict[str, Any]:
    """Three weighted steps with 2 micro batches per rank; the probe scores afterwards."""
    batch = weighted_batches(engine.world_size)[engine.rank]
    losses = [engine.train_step(batch).loss for _ in range(3)]
    probe = engine.score(make_batch(8, seed=99)).tolist()
    return {"rank": engine.rank, "losses": losses, "final_score": probe}


def run_scenario(name: str, out: Path) -> dict[str, Any]:
    from attent_scale.config import config_from_dict
    from attent_scale.engines import build_engine

    engine_name, _, variant = name.partition("_")
    if variant == "accum":
        import torch.distributed as dist

        from attent_scale.dist import init_distributed

        init_distributed()
        return accum_scenario(dist.get_rank() + 1)
    if variant == "bf16":
        raw = tiny_config(engine_name, tied=False)
        raw["engine"]["mixed_precision"] = "bf16"
        return bf16_export_scenario(build_engine(config_from_dict(raw), vocab_size=VOCAB), out)
    if variant == "weighted" or name == "deepspeed_zero2_weighted":
        stage = 2 if name.startswith("deepspeed") else 3
        cfg = config_from_dict(tiny_config(engine_name, stage=stage, grad_accum_steps=2, micro_batch_size=4))
        return weighted_scenario(build_engine(cfg, vocab_size=VOCAB))
    if variant == "skip":
        cfg = config_from_dict(tiny_config(engine_name, tied=False, grad_accum_steps=2, warmup_steps=5))
        return skip_scenario(build_engine(cfg, vocab_size=VOCAB))
    stage = 2 if variant == "zero2" else 3
    lora = variant == "lora"
    cfg = config_from_dict(tiny_config(engine_name, lora=lora, stage=stage, grad_accum_steps=2))
    engine = build_engine(cfg, vocab_size=VOCAB)
    rank = engine.rank
    probe = make_batch(8, seed=99)  # same on every rank
    batch = make_batch(8, seed=rank + 1)  # different per rank
    from attent_scale.dist import all_reduce_flag

    res: dict[str, Any] = {"rank": rank, "world_size": engine.world_size}
    res["flags"] = [all_reduce_flag(rank == 0, "max"), all_reduce_flag(rank == 0, "min")]
    res["initial_score"] = engine.score(probe).tolist()
    res["trainable"] = [n for n, p in engine.model.named_parameters() if p.requires_grad]
    res["losses"] = _steps(engine, batch, 6)
    engine.save(out / "ckpt", "step6")
    after_save = _steps(engine, batch, 2)
    engine.load(out / "ckpt", "step6")
    after_load = _steps(engine, batch, 2)
    res["after_save"], res["after_load"] = after_save, after_load
    res["eval"] = engine.evaluate([probe, batch])
    res["final_score"] = engine.score(probe).tolist()
    engine.export(out / "export")
    return res


def main(scenario: Any = None) -> None:
    """Run `scenario(name, out)` (run_scenario by default) for argv's NAME OUT on this rank and write its
    result to OUT/rank<R>.json; token_worker.py runs its own scenarios through this too."""
    import faulthandler

    faulthandler.dump_traceback_later(HANG_S, exit=True)  # a hung collective shows where, then exits
    name, out = sys.argv[1], Path(sys.argv[2])
    res = (scenario or run_scenario)(name, out)
    (out / f"rank{res['rank']}.json").write_text(json.dumps(res))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from attent_scale.cli import exit_process

    exit_process(0, group_used=True)  # no C++ teardown after the group (attent_scale.cli.exit_process)
