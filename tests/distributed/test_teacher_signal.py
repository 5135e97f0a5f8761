"""Strategy signal on real gloo ranks: the same ids on every rank as on one, exact resume, re-blocking."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import procs
import signal_dist_worker as w
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_select_the_same_ids_as_one_and_resume_exactly(tmp_path: Path) -> None:
    procs.spawn(w.run, (2, _free_port(), str(tmp_path)), 2)  # killed if the test fails or times out
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for method in ("threshold", "gather"):
        one = w.scenario(0, 1, None, topk_method=method)
        assert ranks[0][method]["ids"] == ranks[1][method]["ids"] == one["ids"], method
        for a, b in zip(ranks[0][method]["records"], one["records"], strict=True):
            assert a["signal"] == b["signal"] and a["sha256"] == b["sha256"]
        assert ranks[1][method]["records"][1]["sha256"] is None  # rank 0 writes the record
    # 2-rank states re-blocked onto one rank (elastic resume) select what one rank selects
    states = {r: ranks[r]["threshold"]["state"] for r in range(2)}
    t = w.teacher(None)
    t.load_state_dict(states[0], peers=states)
    ids = np.arange(w.N)
    t.observe(torch.from_numpy(ids), torch.from_numpy(w.losses(ids, 3)), step=40)
    ref = w.teacher(None)
    ref.load_state_dict(w.scenario(0, 1, None)["state"])
    ref.observe(torch.from_numpy(ids), torch.from_numpy(w.losses(ids, 3)), step=40)
    assert t.select(4, step=45).sha256 == ref.select(4, step=45).sha256


