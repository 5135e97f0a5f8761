"""Selection records: one JSON line per selection point, written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attent_scale.totals import PHASES

RECORD_KEYS = (
    "step", "epoch", "cycle", "mode", "strategy", "method", "ratio", "k", "n_scored", "n_selected",
    "n_unseen", "n_nonfinite", "world_size", "seconds", "bytes_per_rank", "bytes_per_rank_max",
    "sha256", "staleness",
    "sources",  # per source of the training ids: teacher/floors.py:source_report (null in online mode)
    # strategy signal: dropped share, counts per reason, thresholds and distributions (signals.pick_signal);
    # teacher.record_bits: the selection as hex bits (little bit order), for benchmark tools
    "signal", "selection_bits",
)


def make_record(**fields: Any) -> dict[str, Any]:
    """A record with exactly RECORD_KEYS (missing ones None); `seconds` gets every phase in PHASES."""
    unknown = set(fields) - set(RECORD_KEYS)
    if unknown:
        raise ValueError(f"unknown record keys: {sorted(unknown)}")
    rec = {key: fields.get(key) for key in RECORD_KEYS}
    secs = dict(rec["seconds"] or {})
    rec["seconds"] = {p: round(float(secs.get(p, 0.0)), 6) for p in PHASES}
    return rec


class RecordWriter:
    """Appends records to a JSON-lines file (selection.jsonl); a no-op without a path."""

    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(path) if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")


def read_records(path: Path | str) -> list[dict[str, Any]]:
    """All records of a selection.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
