"""Ratio and interval schedules over selection cycles: pure functions of the cycle index."""

from __future__ import annotations

import math

RATIO_SCHEDULES = ("constant", "incremental", "cosine", "step")
INTERVAL_SCHEDULES = ("fixed", "incremental")


def round_half_up(x: float) -> int:
    """x rounded to the nearest integer, halves up (the same on every platform, unlike round())."""
    return int(math.floor(x + 0.5))


def _progress(cycle: int, total_cycles: int) -> float:
    """Fraction of the schedule done at `cycle` (0 at the first cycle, 1 at the last and beyond)."""
    if cycle < 0:
        raise ValueError(f"cycle must be >= 0, got {cycle}")
    if total_cycles < 1:
        raise ValueError(f"total_cycles must be >= 1, got {total_cycles}")
    if total_cycles == 1:
        return 1.0
    return min(1.0, cycle / (total_cycles - 1))


def ratio_at(schedule: str, cycle: int, *, initial: float, final: float, total_cycles: int) -> float:
    """Fraction of the pool to select in `cycle` (0-based).

    `constant` stays at `initial`; `incremental` is linear and `cosine` a half-cosine ramp from `initial`
    (cycle 0) to `final` (cycle total_cycles-1); `step` is `initial` for the first half of the cycles
    (cycle < total_cycles // 2) and `final` afterwards. Past the last cycle every schedule stays at its
    final value.
    """
    p = _progress(cycle, total_cycles)
    if schedule == "constant":
        return float(initial)
    if schedule == "incremental":
        return float(initial + (final - initial) * p)
    if schedule == "cosine":
        return float(initial + (final - initial) * (1.0 - math.cos(math.pi * p)) / 2.0)
    if schedule == "step":
        return float(initial if cycle < total_cycles // 2 else final)
    raise ValueError(f"unknown ratio schedule {schedule!r} (one of {', '.join(RATIO_SCHEDULES)})")


def interval_at(schedule: str, cycle: int, *, initial: int, maximum: int, total_cycles: int) -> int:
    """Number of subset epochs in `cycle` (0-based): `fixed` = `initial`; `incremental` rises linearly
    (rounded half up) from `initial` at cycle 0 to `maximum` at cycle total_cycles-1 and stays there."""
    if initial < 1 or maximum < initial:
        raise ValueError(f"need 1 <= initial <= maximum, got initial={initial} maximum={maximum}")
    if schedule == "fixed":
        return int(initial)
    if schedule == "incremental":
        p = _progress(cycle, total_cycles)
        return int(math.floor(initial + (maximum - initial) * p + 0.5))
    raise ValueError(f"unknown interval schedule {schedule!r} (one of {', '.join(INTERVAL_SCHEDULES)})")
