"""The run's export, written whole or not at all: into a temp directory beside it, fsynced, then moved in
entry by entry with export.json last; every rank learns the same outcome (one line, never a rank left in a
barrier).

An export directory holds what `models.export_state_dict` writes (`model/`, or `adapter/` and `merged/`)
and `export.json`, which lists those directories and marks the export complete. A new export replaces
exactly the entries an earlier export.json lists; anything else in the directory is left alone, and an
entry of the new export that would land on such a file stops the export before anything moves.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attent_scale.errors import UserError

INFO = "export.json"
_FULL = re.compile(r"No space left|StorageFull|File too large|FileTooLarge|Disk quota|QuotaExceeded")


class ExportFailed(UserError):
    """The export could not be written; nothing of it was (an earlier export there is as it was)."""

    def keeping(self, checkpoint: Path | None, step: int) -> ExportFailed:
        """This error with where the trained weights are: the run's newest checkpoint (at `step`, the
        run's last step, or earlier), or none."""
        text = str(self)
        if checkpoint is None:
            return ExportFailed(f"{text}; no checkpoint holds the trained weights (checkpoint.every_steps is "
                                "0)")
        fix = "free space" if "disk full" in text else "fix that"
        saved = int(checkpoint.name.rsplit("-", 1)[-1])
        where = f"the trained weights are in checkpoint {checkpoint}" if saved == step else \
            f"the newest checkpoint, {checkpoint}, is from step {saved} of {step}"
        return ExportFailed(f"{text}; {where} ({fix}, then rerun the same command: it resumes there and "
                            "exports)")


def _reason(exc: BaseException) -> str:
    """One line for a failed write; a full disk (ENOSPC, EDQUOT, EFBIG, also inside safetensors' and
    torch's own errors) named as such."""
    inner: BaseException | None = exc
    while inner is not None and not isinstance(inner, OSError):
        inner = inner.__cause__ or inner.__context__
    if isinstance(inner, OSError) and inner.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"disk full ({inner.strerror})"
    text = " ".join(str(exc).split())
    m = _FULL.search(text)
    if m:
        return f"disk full ({os.strerror(errno.EFBIG) if 'arge' in m.group() else m.group()})"
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _listed(out: Path) -> set[str]:
    """The entries an earlier export wrote in OUT: export.json and the directories it lists."""
    try:
        info = json.loads((out / INFO).read_text())
        dirs = [d for d in info["dirs"] if isinstance(d, str) and d and "/" not in d and d not in (".", "..")]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return set()
    return {INFO, *dirs}


def write_export(out_dir: str | Path, write: Callable[[Path], Any]) -> str | None:
    """Run write(tmp) into `.NAME.tmp` beside OUT_DIR, fsync it, and move its entries into OUT_DIR (an
    earlier export's entries replaced, export.json last). None when done; else why it failed, with the
    temp directory removed and OUT_DIR as it was."""
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp"  # one job per run_dir (the run lock): no pid needed
    old = out.parent / f".{out.name}.old"
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed export's temp
        shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        for p in sorted(tmp.rglob("*"), key=lambda q: len(q.parts), reverse=True):  # files, then dirs
            _fsync(p)
        _fsync(tmp)
        new = {p.name for p in tmp.iterdir()}
        out.mkdir(exist_ok=True)
        replaced = _listed(out)
        blocked = sorted(n for n in new if (out / n).exists() and n not in replaced)
        if blocked:
            shutil.rmtree(tmp, ignore_errors=True)
            return f"{', '.join(blocked)} in the way there (not written by an earlier export: move it)"
        old.mkdir()
        for name in sorted(replaced, key=lambda n: n != INFO):  # export.json first: incomplete from here
            if (out / name).exists():
                (out / name).rename(old / name)
        for name in sorted(new, key=lambda n: n == INFO):  # export.json last: complete
            (tmp / name).rename(out / name)
        _fsync(out)
    except Exception as exc:  # safetensors, torch and the OS raise several kinds for one full disk
        for name in sorted(_entries(old), key=lambda n: n == INFO):  # a swap cut short: the earlier back
            if not (out / name).exists():
                (old / name).rename(out / name)
        shutil.rmtree(tmp, ignore_errors=True)
        return _reason(exc)
    finally:
        shutil.rmtree(old, ignore_errors=True)
    tmp.rmdir()
    return None


def _entries(d: Path) -> set[str]:
    try:
        return {p.name for p in d.iterdir()}
    except OSError:
        return set()


def agree(out_dir: str | Path, error: str | None, group: Any = None) -> None:
    """Collective: return on every rank when rank 0's export succeeded, else raise the same ExportFailed on
    every rank."""
    from attent_scale.dist import all_gather_objects, all_reduce_flag

    if all_reduce_flag(error is None, "min", group):
        return
    reason = next(e for e in all_gather_objects(error, group) if e is not None)  # rank 0's, on every rank
    out = Path(out_dir)
    kept = "; the earlier export there is as it was" if (out / INFO).is_file() else ""
    raise ExportFailed(f"export {out}: write failed on rank 0: {reason}; nothing of it written{kept}")


def export_model(state_dict: dict[str, Any] | None, out_dir: str | Path, *, rank: int, group: Any,
                 mcfg: Any, vocab_size: int | None, dtype: str, tokenizer_dir: Path | None = None) -> None:
    """Collective: rank 0 writes the model (`models.export_state_dict`) and, for a model built from
    model.config, the shards' Hugging Face tokenizer beside it, atomically; see `agree`."""
    from attent_scale.models import export_state_dict, save_data_tokenizer

    def write(tmp: Path) -> None:
        export_state_dict(state_dict, mcfg, vocab_size, tmp, dtype=dtype)  # type: ignore[arg-type]
        save_data_tokenizer(tmp, tokenizer_dir)

    error = write_export(out_dir, write) if rank == 0 and state_dict is not None else None
    agree(out_dir, error, group)
