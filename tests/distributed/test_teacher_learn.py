"""Strategies learn and rho on real gloo ranks: the same ids and records on every rank as on one, and the same
after a state round trip (a resumed run selects what an uninterrupted one does)."""

from __future__ import annotations

import socket
from pathlib import Path

import learn_dist_worker as w
import learn_scenario as sc
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_select_the_same_ids_as_one_and_resume_exactly(tmp_path: Path) -> None:
    ref = sc.write_reference(tmp_path / "ref.safetensors")
    mp.spawn(w.run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for method in ("threshold", "gather"):
        one = w.scenario(0, 1, None, ref, topk_method=method)
        for key in ("learn", "rho"):
            assert ranks[0][method][key] == ranks[1][method][key] == one[key], (method, key)
        for a, b in zip(ranks[0][method]["records"], one["records"], strict=True):
            assert a["signal"] == b["signal"] and a["sha256"] == b["sha256"], method
        learn, rho = one["learn"], one["rho"]
        assert learn[0] == learn[1] == learn[2]  # fixed models: the same selection, after a resume too
        assert rho[0] == rho[1]  # the cycle's second subset epoch reuses its first (cached, resumed)
        assert 0 < len(learn[0]) < sc.N and len(rho[0]) == round(0.5 * 999)
