"""attent_scale.malloc: glibc's thresholds fixed for a training process, a user's own choice respected
(each case in a fresh child process: mallopt changes the whole process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from train_runner import REPO

# a 16 MiB block, as a step's activation buffer: mmap'd by glibc's default (threshold 128 KiB at start),
# from the heap once the threshold is fixed, and still in the heap after free (no trim)
HEAP_OR_MMAP = """
import ctypes, sys
from attent_scale.malloc import tune_malloc
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
state = tune_malloc() if sys.argv[1] == "tune" else "untouched"
block = libc.malloc(16 << 20)
held = libc.mallinfo2()
libc.free(block)
freed = libc.mallinfo2()
print(state, held.hblkhd >= 16 << 20, freed.arena >= 16 << 20)
"""


def _child(code: str, *args: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_", "ATTENT_MALLOC"))}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**base, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


STATE = "from attent_scale.malloc import malloc_state, tune_malloc; print(tune_malloc(), '|', malloc_state())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_thresholds_are_fixed_so_a_step_sized_block_comes_from_the_heap_and_stays() -> None:
    assert _child(STATE) == "fixed | fixed"
    assert _child(HEAP_OR_MMAP, "plain") == "untouched True False"  # mmap'd, and unmapped on free
    assert _child(HEAP_OR_MMAP, "tune") == "fixed False True"  # heap, kept for the next step


@pytest.mark.parametrize(("env", "why"), [
    ({"ATTENT_MALLOC": "default"}, "default (ATTENT_MALLOC=default)"),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "default (MALLOC_MMAP_THRESHOLD_ is set)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "default (GLIBC_TUNABLES is set)"),
    ({"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"}, "default (LD_PRELOAD allocator)"),
])
def test_a_users_own_allocator_setting_is_left_alone(env: dict[str, str], why: str) -> None:
    assert _child(STATE, **env) == f"{why} | {why}"


def test_before_tuning_the_state_says_so() -> None:
    assert _child("from attent_scale.malloc import malloc_state; print(malloc_state())") == "not tuned"
