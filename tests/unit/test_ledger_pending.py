"""Ledger pending observations drain in FIFO order in linear time (issue 18 item 5)."""

from __future__ import annotations

import time

import numpy as np

from attent_scale.teacher.ledger import Ledger, pack_entries


def _ledger_with_chunks(n: int) -> Ledger:
    """A rank-0 ledger of 4 ranks holding n pending single-entry chunks (one observe per training step)."""
    led = Ledger(4 * n, rank=0, world_size=4)
    val = pack_entries(np.ones(1, np.float32), 1, 0)
    led._pending = [(np.array([n + j]), val) for j in range(n)]  # what n observe calls leave behind
    led.pending = n
    return led


def test_take_pending_is_fifo_and_cuts_chunks() -> None:
    led = Ledger(100, rank=0, world_size=4)
    led.observe(np.array([70, 71, 72]), np.array([1.0, 2.0, 3.0], np.float32), 1)
    led.observe(np.array([80, 81]), np.array([4.0, 5.0], np.float32), 2)
    ids, val = led._take_pending(2)
    assert ids.tolist() == [70, 71] and led.pending == 3
    ids, val = led._take_pending(2)
    assert ids.tolist() == [72, 80] and led.pending == 1
    assert val.tolist() == [int(pack_entries(np.array([3.0], np.float32), 1, 0)[0]),
                            int(pack_entries(np.array([4.0], np.float32), 2, 0)[0])]
    ids, _ = led._take_pending(10)
    assert ids.tolist() == [81] and led.pending == 0
    assert led._take_pending(10)[0].shape == (0,)


def test_draining_many_chunks_is_linear() -> None:
    """5x the chunks may take about 5x the time, not 25x (list.pop(0) per chunk was quadratic)."""
    def drain_seconds(n: int) -> float:
        led = _ledger_with_chunks(n)
        t0 = time.perf_counter()
        while led.pending:
            led._take_pending(1000)
        return time.perf_counter() - t0

    small, big = min(drain_seconds(20_000) for _ in range(2)), drain_seconds(100_000)
    assert big < 12 * small + 0.2, (small, big)
