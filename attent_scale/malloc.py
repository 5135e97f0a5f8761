"""glibc malloc thresholds for a training process: fixed, so a step's tensors stop being mapped and unmapped.

glibc serves allocations above its mmap threshold (128 KiB at start, raised dynamically as such blocks are
freed) with fresh mmap'd pages and returns heap tops above the trim threshold to the kernel. A training
step allocates and frees the same activation and gradient buffers every step, so which of them come from
new pages depends on the order the dynamic threshold happened to grow in: on the bench_step model one
process took 0.2 million minor page faults and the next 1.7 million, with 0.5 against 2.4 s of system
time (tools/benchmarks/bench_step.py, docs/benchmarks.md). Fixing both thresholds, as PyTorch's CPU
tuning guides do with jemalloc or tcmalloc, keeps those buffers in the heap and reuses them.

A user's own setting wins: MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / GLIBC_TUNABLES, a preloaded
allocator, or ATTENT_MALLOC=default leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for the next step instead of returning it
USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_done: str | None = None  # what tune_malloc did in this process


def malloc_state() -> str:
    """What `tune_malloc` did in this process ("not tuned" before it ran)."""
    return _done or "not tuned"


def tune_malloc() -> str:
    """Fix glibc's mmap and trim thresholds for this process unless the user set their own; returns what
    was done ("fixed", or why not: summary.json's `malloc`). Idempotent."""
    global _done
    if _done is None:
        _done = _tune()
    return _done


def _tune() -> str:
    if os.environ.get("ATTENT_MALLOC", "") == "default":
        return "default (ATTENT_MALLOC=default)"
    user = [k for k in USER_ENV if k in os.environ]
    if user:
        return f"default ({user[0]} is set)"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(a in preload for a in ALLOCATORS):
        return "default (LD_PRELOAD allocator)"
    if not sys.platform.startswith("linux"):
        return "default (not glibc)"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  only glibc has it (musl has mallopt as a no-op)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "default (mallopt refused)"
    return "fixed"
