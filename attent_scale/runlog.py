"""Run-directory files: JSON lines (metrics, eval) and summary, written by rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonLines:
    """Append-only JSON-lines file; a no-op on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self._fh = path.open("a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(_clean(record)) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class RunLogs:
    """The run's JSON-lines logs (metrics.jsonl, eval.jsonl; selection.jsonl is the teacher's): their line
    counts are a checkpoint entry ("logs"), so a resume cuts every file back to its checkpoint."""

    NAMES = ("metrics.jsonl", "eval.jsonl", "selection.jsonl")

    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.run_dir, self.is_main = run_dir, is_main
        self.metrics: JsonLines | None = None
        self.eval: JsonLines | None = None

    def reset(self, lines: dict[str, int] | None) -> None:
        """Before the run writes: cut each file back to `lines` (a resume), or start them empty (None)."""
        if not self.is_main:
            return
        for name in self.NAMES:
            if lines is None:
                (self.run_dir / name).unlink(missing_ok=True)
            else:
                truncate_lines(self.run_dir / name, lines.get(name, 0))

    def load_state_dict(self, lines: dict[str, int]) -> None:
        """A resume: cut each file back to its line count at the checkpoint (`reset`)."""
        self.reset(lines)

    def open(self) -> None:
        """Open our own files for appending (after `reset`; the teacher appends its records itself)."""
        self.metrics = JsonLines(self.run_dir / "metrics.jsonl", self.is_main)
        self.eval = JsonLines(self.run_dir / "eval.jsonl", self.is_main)

    def state_dict(self) -> dict[str, int]:
        return {name: count_lines(self.run_dir / name) if self.is_main else 0 for name in self.NAMES}

    def close(self) -> None:
        for log in (self.metrics, self.eval):
            if log is not None:
                log.close()


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def truncate_lines(path: Path, keep: int) -> None:
    """On resume, drop lines written after the checkpoint so the files read as one uninterrupted run."""
    if path.exists():
        lines = path.read_text().splitlines()[:keep]
        path.write_text("".join(f"{line}\n" for line in lines))


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2) + "\n")
    tmp.replace(path)


def write_run_config(run_dir: Path, cfg: Any, planned_steps: int) -> None:
    """config.yaml: the user's config as the run reads it (train.max_steps is the user's cap: rerunning it
    re-plans from scratch), headed by the steps the run plans under an epoch budget."""
    import yaml

    from attent_scale.config import config_to_dict

    head = ""
    if cfg.train.max_epochs:
        head = (f"# planned steps: {planned_steps} (train.max_epochs {cfg.train.max_epochs} under the "
                "teacher's plan, capped by train.max_steps; the LR schedule decays over them)\n")
    (run_dir / "config.yaml").write_text(head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
