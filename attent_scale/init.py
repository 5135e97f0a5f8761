"""`attent-scale init DIR`: copy the shipped configs, launch scripts and ops files into a folder to edit."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from attent_scale import assets
from attent_scale.errors import UserError

FOLDERS = ("configs", "launch", "ops")  # what init copies, as they are laid out in the package


def shipped_files() -> list[Path]:
    """The files init writes, relative to the assets folder (sorted; no Python sources, no caches)."""
    base = assets.root()
    return sorted(p.relative_to(base) for folder in FOLDERS for p in (base / folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def write_starter(out: str | Path, *, force: bool = False) -> list[Path]:
    """Copy every shipped file into `out` (created if needed); returns the paths written. An existing file
    is an error naming it, and nothing is written, unless `force` (then the shipped files replace theirs;
    other files in `out` are left alone)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"init {out}: exists and is not a directory")
    rel = shipped_files()
    if not force:
        clash = [r for r in rel if (out / r).exists()]
        if clash:
            raise UserError(f"init {out}: {out / clash[0]} exists ({len(clash)} of the {len(rel)} files do); "
                            "pass --force to replace them with the shipped ones")
    written = []
    for r in rel:
        dest = out / r
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(assets.root() / r, dest)
            if dest.suffix in (".sbatch", ".sh"):
                dest.chmod(0o755)
        except OSError as exc:
            raise UserError(f"init {out}: cannot write {dest} ({exc.strerror or exc})") from None
        written.append(dest)
    return written


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("init", help="write the starter configs, Slurm scripts and the Grafana/"
                              "Prometheus files into a folder")
    p.add_argument("dir", help="folder to write into (created if needed)")
    p.add_argument("--force", action="store_true", help="replace files of the same name that are there")
    p.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    written = write_starter(args.dir, force=args.force)
    out = Path(args.dir)
    print(f"wrote {len(written)} files into {out}: configs/ (run configs; start from configs/demo.yaml), "
          "launch/ (sbatch scripts and local.sh), ops/ (Grafana dashboard, Prometheus config)")
    print(f"next: cd {out} && attent-scale shards build TEXTS/ --out runs/shards && "
          "sbatch launch/slurm_torchrun.sbatch configs/demo.yaml --set data.dir=runs/shards")
    return 0
