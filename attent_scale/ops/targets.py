"""Write a Prometheus file_sd target file for a Slurm job: one exporter per node x local rank.

Run by the launch scripts as ``python -m attent_scale.ops.targets --out FILE --ranks-per-node N``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from attent_scale.hostlist import hostnames


def targets(hosts: list[str], ranks_per_node: int, base_port: int, slurm_job_id: str = "") -> list[dict]:
    """file_sd groups: one per node, its ``ranks_per_node`` ports, labels node and (under Slurm)
    slurm_job_id, the labels the exporters put on their series too, so ``up`` lines up with them. No
    ``job`` label: that is the scrape config's ``job_name``."""
    def labels(host: str) -> dict[str, str]:
        return {"node": host, **({"slurm_job_id": slurm_job_id} if slurm_job_id else {})}

    return [{"targets": [f"{h}:{base_port + r}" for r in range(ranks_per_node)], "labels": labels(h)}
            for h in hosts]


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
    p = argparse.ArgumentParser(prog="python -m attent_scale.ops.targets", description=__doc__)
    p.add_argument("--out", required=True, type=Path, help="target JSON file (in a file_sd directory)")
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST", ""),
                   help="compact Slurm node list (default: $SLURM_JOB_NODELIST)")
    p.add_argument("--ranks-per-node", type=int, required=True)
    p.add_argument("--base-port", type=int, default=19400)
    p.add_argument("--slurm-job-id", default=os.environ.get("SLURM_JOB_ID", ""),
                   help="slurm_job_id label (default: $SLURM_JOB_ID; empty: no such label)")
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
    write_atomic(args.out, targets(hosts, args.ranks_per_node, args.base_port, args.slurm_job_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
