"""The teacher's collectives (torch.distributed or a simulated group), with bytes and seconds per phase."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attent_scale.dist import initialized


class TorchOps:
    """The collectives of torch.distributed, in the signatures Comm uses (a simulated group, see
    teacher/simulate.py, offers the same methods, so both run the same selection code)."""

    ReduceOp = dist.ReduceOp

    @staticmethod
    def get_world_size(group: Any) -> int:
        return dist.get_world_size(group)

    @staticmethod
    def get_rank(group: Any) -> int:
        return dist.get_rank(group)

    @staticmethod
    def all_gather(out: list[torch.Tensor], t: torch.Tensor, group: Any) -> None:
        dist.all_gather(out, t, group=group)

    @staticmethod
    def all_reduce(t: torch.Tensor, op: Any, group: Any) -> None:
        dist.all_reduce(t, op=op, group=group)

    @staticmethod
    def all_to_all_single(out: torch.Tensor, t: torch.Tensor, out_splits: list[int] | None,
                          in_splits: list[int] | None, group: Any) -> None:
        if out_splits is None:
            dist.all_to_all_single(out, t, group=group)
        else:
            dist.all_to_all_single(out, t, out_splits, in_splits, group=group)


def collective_ops(group: Any) -> Any:
    """The collectives for `group`: a simulated group's own methods, else torch.distributed's."""
    return group if getattr(group, "simulated", False) else TorchOps


class Comm:
    """Thin wrapper over the collectives that counts bytes sent by this rank (ring model) and time."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.ops = collective_ops(group)
        self.world = self.ops.get_world_size(group)
        self.rank = self.ops.get_rank(group)
        self.bytes: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def _add(self, phase: str, nbytes: float, t0: float) -> None:
        self.bytes[phase] = self.bytes.get(phase, 0) + int(nbytes)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def all_gather(self, t: torch.Tensor, phase: str) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        out = list(torch.empty((self.world, *t.shape), dtype=t.dtype).unbind(0))  # views of one buffer
        self.ops.all_gather(out, t, self.group)
        self._add(phase, (self.world - 1) * t.numel() * t.element_size(), t0)
        return out

    def all_gather_into(self, out: torch.Tensor, t: torch.Tensor, phase: str) -> torch.Tensor:
        """all_gather of equal-sized 1-d tensors straight into `out` (world * t.numel() elements)."""
        t0 = time.perf_counter()
        self.ops.all_gather(list(out.view(self.world, -1).unbind(0)), t, self.group)
        self._add(phase, (self.world - 1) * t.numel() * t.element_size(), t0)
        return out

    def all_reduce(self, t: torch.Tensor, phase: str, op: Any = None) -> torch.Tensor:
        t0 = time.perf_counter()
        self.ops.all_reduce(t, dist.ReduceOp.SUM if op is None else op, self.group)
        self._add(phase, 2 * (self.world - 1) / self.world * t.numel() * t.element_size(), t0)
        return t

    def all_to_all(self, t: torch.Tensor, send_counts: list[int], phase: str) -> torch.Tensor:
        """all_to_all_single along dim 0 with per-destination row counts; returns the received rows."""
        t0 = time.perf_counter()
        cnt = torch.tensor(send_counts, dtype=torch.int64)
        recv_cnt = torch.empty_like(cnt)
        self.ops.all_to_all_single(recv_cnt, cnt, None, None, self.group)
        rest = tuple(t.shape[1:])
        out = torch.empty((int(recv_cnt.sum()), *rest), dtype=t.dtype)
        self.ops.all_to_all_single(out, t, recv_cnt.tolist(), list(send_counts), self.group)
        row = t.element_size() * (int(np.prod(rest)) if rest else 1)
        sent = (sum(send_counts) - send_counts[self.rank]) * row + (self.world - 1) * 8
        self._add(phase, sent, t0)
        return out


def resolve_group(group: Any) -> Any:
    """The process group to use (a simulated one included), or None for the single-process path."""
    if group is None:
        if not initialized():
            return None
        group = dist.group.WORLD
    return group if collective_ops(group).get_world_size(group) > 1 else None
