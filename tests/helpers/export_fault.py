"""`python -m export_fault train ...`: the trainer, on a disk that fills up the moment the export begins.

When `attent_scale.models.export_state_dict` is first called (rank 0 writes the export), this process's
RLIMIT_FSIZE drops to ATTENT_EXPORT_FSIZE bytes: from then on the kernel fails every write that would grow
a file past it (EFBIG; Python ignores SIGXFSZ), as a full disk would. Everything else is the real trainer;
the checkpoints written before the export (larger than the limit) are unaffected.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from attent_scale import models
from attent_scale.cli import run

_real = models.export_state_dict


def _full_disk_export(*args: Any, **kwargs: Any) -> Any:
    limit = int(os.environ["ATTENT_EXPORT_FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return _real(*args, **kwargs)


if __name__ == "__main__":
    models.export_state_dict = _full_disk_export  # type: ignore[assignment]
    run()
