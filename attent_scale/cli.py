"""attent-scale command line: one subcommand per module, each registering itself with `add_parser`."""

from __future__ import annotations

import argparse
import importlib
import sys

from attent_scale import __version__
from attent_scale.errors import UserError

# subcommand -> module exposing `add_parser(subparsers)`; the parser it adds sets `func(args) -> int`.
COMMANDS = {
    "shards": "attent_scale.data.cli",
    "train": "attent_scale.train",
    "demo": "attent_scale.demo",
    "bench": "attent_scale.bench",
    "score": "attent_scale.score",
    "simulate": "attent_scale.simulate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attent-scale", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # subcommand not built yet
        module.add_parser(sub)
    train = sub.choices.get("train")
    if train is not None:  # `train --help` ends with the config sections and their keys
        from attent_scale.config import sections_help

        train.epilog = sections_help()
        train.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # without importing torch
        print(f"attent-scale {__version__}")
        return 0
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"attent-scale: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
