"""DeepSpeed starts on CPU even where a killed process left torch's extension-build lock behind."""

from __future__ import annotations

import os
import sys
import textwrap

import procs
import pytest

pytest.importorskip("deepspeed")

SCRIPT = textwrap.dedent("""
    import os
    import torch.distributed as dist
    from attent_scale.dist import ensure_accelerator_env, init_deepspeed_comm
    ensure_accelerator_env()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    init_deepspeed_comm()
    import deepspeed.comm as dscomm
    print("ok", dscomm.get_world_size())
""")


def test_a_stale_extension_lock_does_not_hang_deepspeed_init(tmp_path):
    lock = tmp_path / "py_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()  # what a process killed inside torch.utils.cpp_extension's build leaves
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(lock.parent.parent), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    proc = procs.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                     timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["ok", "1"]
    assert lock.exists() and len(list(lock.parent.iterdir())) == 1  # nothing was built or waited on
