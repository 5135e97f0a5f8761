"""Print the run_dir of a `train --config CONFIG [--set ...]` command: python -m attent_scale.ops.run_dir."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    from attent_scale.config import add_override_argument, load_config
    from attent_scale.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m attent_scale.ops.run_dir", add_help=False)
    parser.add_argument("config")
    add_override_argument(parser)
    args, _ = parser.parse_known_args(argv)  # the other train options do not move run_dir
    try:
        print(load_config(args.config, args.overrides).run_dir)
    except UserError as exc:
        print(f"attent-scale: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
