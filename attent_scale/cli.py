"""attent-scale command line: one subcommand per module, each registering itself with `add_parser`."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import os
import sys
from typing import NoReturn

from attent_scale import __version__
from attent_scale.errors import UserError

# subcommand -> module exposing `add_parser(subparsers)`; the parser it adds sets `func(args) -> int`.
COMMANDS = {
    "shards": "attent_scale.data.cli",
    "train": "attent_scale.train",
    "demo": "attent_scale.demo",
    "bench": "attent_scale.bench",
    "score": "attent_scale.score",
    "reference": "attent_scale.reference_fit",
    "simulate": "attent_scale.simulate",
    "init": "attent_scale.init",
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


def run(argv: list[str] | None = None) -> NoReturn:
    """The process entry point (`attent-scale`, `python -m attent_scale`): `main`, then `exit_process`.
    An exception that escapes `main` prints its traceback and exits 1, as Python itself would."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: --help, usage errors
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"), as Python prints it
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    exit_process(code)


def exit_process(code: int, *, group_used: bool = False) -> NoReturn:
    """Exit with `code`. A process that used a process group (joined one through attent_scale.dist, has
    one up, or says so with `group_used`) runs its atexit handlers, flushes stdio and leaves by os._exit,
    skipping the interpreter's C++ teardown: there a gloo rank whose run had finished and whose group was
    destroyed aborted about once in 100 four-rank FSDP runs ("terminate called without an active
    exception", no Python frame left), turning a finished run into SIGABRT."""
    dist_module = sys.modules.get("attent_scale.dist")
    torch_dist = sys.modules.get("torch.distributed")
    used = (group_used or (dist_module is not None and dist_module.joined_group())
            or (torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized()))
    if not used:
        sys.exit(code)
    atexit._run_exitfuncs()  # what Py_Finalize would run first: run_dir lock release, multiprocessing
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
