"""What token-level selection costs per micro batch, beside the step it selects for: the learner's training
forward + backward, the reference's online forward (a frozen model beside the learner, or a reference
adapter on the learner's peft model) and the global token threshold (`teacher.tokens.token_weights`) on 1
and W gloo ranks, with the bytes each rank sends for the threshold; then the native engine's whole step
(engine local, one micro batch) with teacher.unit sample, token + random mask, token + frozen reference
(teacher/token_step.py: what a token-unit run pays per step beside a sample-level one).

    python tools/benchmarks/bench_tokens.py [--batch 8] [--seq 256] [--layers 4] [--embd 256] [--vocab 8192]
        [--ref-layers 2] [--ref-embd 128] [--keep 0.6] [--repeat 5] [--worlds 2] [--json out.json]

CPU timings on a shared machine are indicative only; the bytes are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attent_scale.config import LoraConfig, ModelConfig
from attent_scale.engines.base import IGNORE_INDEX, token_ce
from attent_scale.models import build_model
from attent_scale.teacher.comm import Comm
from attent_scale.teacher.tokens import token_weights


def _shape(layers: int, embd: int, seq: int) -> dict[str, Any]:
    return {"model_type": "gpt2", "n_layer": layers, "n_embd": embd, "n_head": max(1, embd // 64),
            "n_positions": seq, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _gpt(layers: int, embd: int, vocab: int, seq: int, lora: bool = False) -> torch.nn.Module:
    shape = _shape(layers, embd, seq)
    return build_model(ModelConfig(config=shape, lora=LoraConfig(enabled=lora, r=8)), vocab, seed=0)


def _batch(args: argparse.Namespace, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    y[:, : args.seq // 8] = IGNORE_INDEX  # a prompt
    return torch.arange(args.batch), x, y


def _time(fn: Any, repeat: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def one_rank(args: argparse.Namespace) -> dict[str, float]:
    ids, x, y = _batch(args)
    learner = _gpt(args.layers, args.embd, args.vocab, args.seq)
    frozen = _gpt(args.ref_layers, args.ref_embd, args.vocab, args.seq).eval().requires_grad_(False)

    def step() -> None:
        token_ce(learner(input_ids=x).logits, y).sum().backward()

    def ref() -> None:
        with torch.no_grad():
            token_ce(frozen(input_ids=x).logits, y)

    lt = token_ce(learner(input_ids=x).logits, y).detach()
    with torch.no_grad():
        rt = token_ce(frozen(input_ids=x).logits, y)
    valid = y != IGNORE_INDEX
    out = {"learner_step_s": _time(step, args.repeat), "frozen_reference_forward_s": _time(ref, args.repeat),
           "threshold_s": _time(lambda: token_weights(ids, lt, rt, valid, args.keep), args.repeat)}
    peft = _gpt(args.layers, args.embd, args.vocab, args.seq, lora=True)
    with tempfile.TemporaryDirectory() as d:
        peft.save_pretrained(d)
        from attent_scale.engines.reference import AdapterReference

        adapter = AdapterReference(peft, d)
        out["adapter_reference_forward_s"] = _time(lambda: adapter.token_losses(x, y), args.repeat)
    return out


def engine_steps(args: argparse.Namespace) -> dict[str, float]:
    """engine local's train_step on one micro batch: without token selection, with a random mask, and
    with a frozen reference (its online forward, the threshold and the masked loss)."""
    from attent_scale.config import TeacherConfig, config_from_dict
    from attent_scale.engines.local import LocalEngine
    from attent_scale.engines.reference import FrozenReference
    from attent_scale.teacher.token_step import TokenStep

    shape = _shape(args.layers, args.embd, args.seq)
    cfg = config_from_dict({"model": {"config": shape}, "train": {"micro_batch_size": args.batch,
                                                                  "warmup_steps": 0}})
    engine = LocalEngine(cfg, args.vocab, device=torch.device("cpu"))
    ids, x, y = _batch(args)
    batch = {"ids": ids, "input_ids": x, "labels": y}
    out = {"engine_step_s": _time(lambda: engine.train_step(batch), args.repeat)}
    keep = args.keep
    rnd = TokenStep(TeacherConfig(unit="token", strategy="random", token_ratio=keep), seed=0, world=1)
    out["engine_step_token_random_s"] = _time(lambda: engine.train_step(batch, tokens=rnd), args.repeat)
    with tempfile.TemporaryDirectory() as d:
        _gpt(args.ref_layers, args.ref_embd, args.vocab, args.seq).save_pretrained(d)
        hard = TokenStep(TeacherConfig(unit="token", strategy="hard", token_ratio=keep, token_reference=d),
                         seed=0, world=1)
        hard.reference = FrozenReference(d, torch.device("cpu"))
        out["engine_step_token_hard_s"] = _time(lambda: engine.train_step(batch, tokens=hard), args.repeat)
    out["engine_kept_token_share"] = hard.share
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ids, x, y = _batch(args, seed=rank)
    g = torch.Generator().manual_seed(rank)
    lt, rt = torch.rand(x.shape, generator=g) * 5, torch.rand(x.shape, generator=g) * 5
    valid = y != IGNORE_INDEX
    sent = {"bytes": 0}  # one rank: no collective at all (resolve_group gives None), nothing sent
    orig = Comm.all_reduce

    def counting(self: Comm, t: torch.Tensor, phase: str, op: Any = dist.ReduceOp.SUM) -> None:
        sent["bytes"] += int(2 * (world - 1) / world * t.numel() * t.element_size())
        orig(self, t, phase, op=op)

    Comm.all_reduce = counting  # type: ignore[method-assign]
    secs = _time(lambda: token_weights(ids + rank * args.batch, lt, rt, valid, args.keep, dist.group.WORLD),
                 args.repeat)
    calls = args.repeat + 1
    if rank == 0:
        Path(out).write_text(json.dumps({"threshold_s": secs, "bytes_per_call": sent["bytes"] // calls}))
    dist.barrier()
    dist.destroy_process_group()


def many_ranks(args: argparse.Namespace, world: int) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "r.json")
        mp.spawn(_worker, args=(world, port, args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("batch", 8), ("seq", 256), ("layers", 4), ("embd", 256), ("vocab", 8192),
                          ("ref-layers", 2), ("ref-embd", 128), ("repeat", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--worlds", default="2", help="comma-separated gloo world sizes for the threshold")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    res: dict[str, Any] = {"tokens_per_micro_batch": args.batch * args.seq, **one_rank(args),
                           **engine_steps(args)}
    for w in (int(v) for v in args.worlds.split(",") if v):
        res[f"world{w}"] = many_ranks(args, w)
    step = res["learner_step_s"]
    print(f"micro batch {args.batch} x {args.seq} tokens; learner {args.layers} x {args.embd}, reference "
          f"{args.ref_layers} x {args.ref_embd}, vocab {args.vocab}, keep {args.keep}; one thread")
    for key in ("learner_step_s", "frozen_reference_forward_s", "adapter_reference_forward_s", "threshold_s"):
        print(f"  {key:30} {res[key] * 1e3:9.1f} ms  ({100 * res[key] / step:5.1f}% of the learner's step)")
    base = res["engine_step_s"]
    for key in ("engine_step_s", "engine_step_token_random_s", "engine_step_token_hard_s"):
        print(f"  {key:30} {res[key] * 1e3:9.1f} ms  ({res[key] / base:5.2f}x engine local's step, "
              "teacher.unit sample)")
    for w in (k for k in res if k.startswith("world")):
        r = res[w]
        print(f"  threshold on {w[5:]} gloo ranks     {r['threshold_s'] * 1e3:9.1f} ms, "
              f"{r['bytes_per_call'] / 1024:.1f} KiB sent per rank per micro batch")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
