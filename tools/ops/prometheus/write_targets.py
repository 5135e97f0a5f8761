"""Write a Prometheus file_sd target file for a Slurm job: one exporter per node x local rank."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def expand_hostlist(text: str) -> list[str]:
    """Expand Slurm's compact host list (``a[01-03,7],b-[1-2]-ib,c``) without Slurm; order kept."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    items.append(text[start:])
    hosts: list[str] = []
    for item in (x.strip() for x in items):
        if not item:
            continue
        parts = re.split(r"(\[[^\]]*\])", item)
        choices: list[list[str]] = []
        for part in parts:
            if part.startswith("["):
                choices.append(_expand_range(part[1:-1], text))
            elif part:
                choices.append([part])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _expand_range(body: str, text: str) -> list[str]:
    out: list[str] = []
    for piece in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", piece.strip())
        if not m:
            raise ValueError(f"bad range {piece!r} in host list {text!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {piece!r} in host list {text!r}")
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def hostnames(nodelist: str) -> list[str]:
    """Hosts of a Slurm node list: ``scontrol show hostnames`` when available, else the pure parser.

    The list is validated first: scontrol prints something for a malformed list too (``x[1-`` -> ``x]``).
    """
    parsed = expand_hostlist(nodelist)  # raises ValueError on a malformed list
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return parsed


def targets(hosts: list[str], ranks_per_node: int, base_port: int, job: str) -> list[dict]:
    """file_sd groups: one per node, its ``ranks_per_node`` ports, labels job and node."""
    return [{"targets": [f"{h}:{base_port + r}" for r in range(ranks_per_node)],
             "labels": {"job": job, "node": h}} for h in hosts]


def write_atomic(path: Path, data: object) -> None:
    """Write JSON to a temp file beside ``path`` and rename it over, so Prometheus never reads half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, type=Path, help="target JSON file (in a file_sd directory)")
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST", ""),
                   help="compact Slurm node list (default: $SLURM_JOB_NODELIST)")
    p.add_argument("--ranks-per-node", type=int, required=True)
    p.add_argument("--base-port", type=int, default=19400)
    p.add_argument("--job", default=os.environ.get("SLURM_JOB_ID", "attent"),
                   help="job label (default: $SLURM_JOB_ID)")
    args = p.parse_args(argv)
    if not args.nodelist:
        print("write_targets: no node list (--nodelist or SLURM_JOB_NODELIST)", file=sys.stderr)
        return 2
    if args.ranks_per_node < 1 or not 0 < args.base_port <= 65535 - args.ranks_per_node:
        print("write_targets: --ranks-per-node must be >= 1 and the ports within 1..65535", file=sys.stderr)
        return 2
    try:
        hosts = hostnames(args.nodelist)
    except ValueError as exc:
        print(f"write_targets: {exc}", file=sys.stderr)
        return 2
    write_atomic(args.out, targets(hosts, args.ranks_per_node, args.base_port, args.job))
    return 0


if __name__ == "__main__":
    sys.exit(main())
