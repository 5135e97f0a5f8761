"""The one command line that starts a program on N local ranks (torchrun) or as one plain process.

A given launcher goes in front as it is: torchrun, the deepspeed runner, or srun inside a Slurm job
(``"srun --ntasks=4"``: each task finds its rank in SLURM_* itself, attent_scale/srun.py)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

TRAIN = ("-m", "attent_scale", "train")  # the trainer's CLI: what most launches run


def command(target: Sequence[str] = TRAIN, nproc: int = 1, *, launcher: str | Sequence[str] | None = None,
            rendezvous: Sequence[str] = ("--standalone",), torchrun: bool = False) -> list[str]:
    """argv that runs ``target`` (``-m module args...`` or ``script.py args...``).

    ``launcher`` (a string is split like a shell would) is put before ``target`` as given, e.g.
    ``"torchrun --nproc-per-node 2"``; otherwise ``nproc`` 1 is this interpreter and more is
    ``python -m torch.distributed.run`` with ``rendezvous`` (one host, a free port) and ``nproc`` ranks;
    ``torchrun`` launches one rank through torchrun too (its environment, its signal forwarding).
    """
    if launcher:
        prefix = shlex.split(launcher) if isinstance(launcher, str) else list(launcher)
    elif nproc <= 1 and not torchrun:
        prefix = [sys.executable]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={nproc}"]
    return [*prefix, *target]
