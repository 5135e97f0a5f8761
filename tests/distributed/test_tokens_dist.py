"""The global token threshold on real gloo ranks: two ranks holding half of the rows each keep exactly the
tokens one rank keeps with all of them (one threshold, never a per-rank cut)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attent_scale.cli import exit_process
from attent_scale.teacher.tokens import token_weights

KEEPS = (0.3, 0.65, 1.0)


def _rows() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    b, t = 10, 24
    learner, reference = torch.rand(b, t, generator=g) * 5, torch.rand(b, t, generator=g) * 5
    learner[2] = reference[2] + 0.5  # a row of ties: broken by (id, position), not by rank
    valid = torch.rand(b, t, generator=g) > 0.2
    return torch.arange(40, 40 + b), learner, reference, valid


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ids, learner, reference, valid = _rows()
        mine = torch.arange(ids.shape[0])[rank::world]  # interleaved rows: unequal, unsorted shares
        res = {}
        for keep in KEEPS:
            pick = token_weights(ids[mine], learner[mine], reference[mine], valid[mine], keep,
                                 dist.group.WORLD)
            res[keep] = (mine, pick.weights, pick.valid, pick.kept)
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_process(0, group_used=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_keep_the_tokens_one_rank_keeps(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ids, learner, reference, valid = _rows()
    for keep in KEEPS:
        one = token_weights(ids, learner, reference, valid, keep)
        merged = torch.zeros_like(one.weights)
        for r in range(2):
            rows, weights, n_valid, kept = ranks[r][keep]
            merged[rows] = weights
            assert (n_valid, kept) == (one.valid, one.kept), keep  # global counts on every rank
        assert torch.equal(merged, one.weights), keep
        assert 0 < one.kept <= one.valid
