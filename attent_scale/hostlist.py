"""Slurm's compact host lists (``gpu[01-03,7],login``): expanded without Slurm, or by ``scontrol``."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess


def expand_hostlist(text: str) -> list[str]:
    """Expand Slurm's compact host list (``a[01-03,7],b-[1-2]-ib,c``) without Slurm; order kept.
    A malformed list raises ValueError naming it."""
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
