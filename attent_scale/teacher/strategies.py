"""Selection strategies as key functions of (loss, seed, cycle, id) with counter-based noise."""

from __future__ import annotations

import numpy as np
import torch

STRATEGIES = ("hard", "soft", "random")
NORMALIZATIONS = ("softmax", "sigmoid")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _as_numpy(x: torch.Tensor | np.ndarray, dtype: np.dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype).reshape(-1)


def _mix_scalar(x: int) -> int:
    """splitmix64 finaliser on one Python int (mod 2^64)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element of a uint64 array (a new array; wraps mod 2^64)."""
    z = x + _GOLDEN
    tmp = np.empty_like(z)
    _finish(z, tmp)
    return z


def _finish(z: np.ndarray, tmp: np.ndarray) -> None:
    """In-place splitmix64 finaliser steps after the golden-ratio increment (tmp is scratch)."""
    np.right_shift(z, np.uint64(30), out=tmp)
    z ^= tmp
    z *= _M1
    np.right_shift(z, np.uint64(27), out=tmp)
    z ^= tmp
    z *= _M2
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp


def uniform_noise(ids: torch.Tensor | np.ndarray, *, seed: int, cycle: int) -> np.ndarray:
    """Counter-based uniform numbers in (0, 1), float64, one per id: a pure function of (seed, cycle, id),
    so the same id gets the same number on any rank, in any worker, at any world size."""
    stream = _mix_scalar(_mix_scalar(int(seed) & 0xFFFFFFFFFFFFFFFF) ^ (int(cycle) & 0xFFFFFFFFFFFFFFFF))
    x = _as_numpy(ids, np.int64).view(np.uint64)
    out = np.empty(x.shape[0], dtype=np.float64)
    step = 1 << 18  # cache-sized chunks: no large temporaries
    with np.errstate(over="ignore"):
        for i in range(0, x.shape[0], step):
            z = x[i:i + step] ^ np.uint64(stream)
            tmp = np.empty_like(z)
            z += _GOLDEN
            _finish(z, tmp)
            np.right_shift(z, np.uint64(11), out=z)
            u = out[i:i + step]
            np.copyto(u, z, casting="unsafe")  # exact: values < 2**53
            u += 0.5
            u *= 2.0**-53
    return out


def gumbel_noise(ids: torch.Tensor | np.ndarray, *, seed: int, cycle: int) -> np.ndarray:
    """Standard Gumbel noise -log(-log(u)) from `uniform_noise` (always finite)."""
    g = uniform_noise(ids, seed=seed, cycle=cycle)
    np.log(g, out=g)
    np.negative(g, out=g)
    np.log(g, out=g)
    np.negative(g, out=g)
    return g


def strategy_keys(
    strategy: str,
    losses: torch.Tensor | np.ndarray,
    ids: torch.Tensor | np.ndarray,
    *,
    seed: int,
    cycle: int,
    temperature: float = 1.0,
    normalization: str = "softmax",
) -> torch.Tensor:
    """Per-sample ranking keys (float64, larger = selected first) for `hard`, `soft` or `random`.

    hard: key = loss. soft (Gumbel-top-k, i.e. sampling k without replacement with probability
    proportional to softmax(loss / temperature) or sigmoid(loss)^(1/temperature)): key = loss / T + G or
    log-sigmoid(loss) / T + G, G = Gumbel noise keyed by (seed, cycle, id). random: key = G.
    Non-finite losses get a NaN key for hard and soft (never ranked before a finite key).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r} (one of {', '.join(NORMALIZATIONS)})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids_np = _as_numpy(ids, np.int64)
    if strategy == "random":
        return torch.from_numpy(gumbel_noise(ids_np, seed=seed, cycle=cycle))
    loss = _as_numpy(losses, np.float64)
    if loss.shape != ids_np.shape:
        raise ValueError(f"losses and ids differ in length: {loss.shape[0]} vs {ids_np.shape[0]}")
    bad = ~np.isfinite(loss)
    any_bad = bool(bad.any())
    if strategy == "hard":
        keys = np.array(loss, dtype=np.float64, copy=True)
    else:
        base = np.where(bad, 0.0, loss) if any_bad else loss
        if normalization == "sigmoid":
            base = -np.logaddexp(0.0, -base)  # log-sigmoid, computed stably
        keys = gumbel_noise(ids_np, seed=seed, cycle=cycle)
        if temperature == 1.0:
            keys += base
        else:
            keys += base / float(temperature)
    if any_bad:
        keys[bad] = np.nan
    return torch.from_numpy(keys)
