"""`hierfed` commands. Thin: each sub-command lives in hierfed.commands; this only assembles them.

    hierfed run                          # default topology + embedded defaults; launches mpiexec itself
    hierfed launch|sweep|topology ...    # see `hierfed COMMAND --help`
"""

from __future__ import annotations

import argparse
import sys

from hierfed import __version__
from hierfed.commands import launch, run, sweep, topology
from hierfed.errors import HierfedError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hierfed", description="Hierarchical cloud-edge-device federated fine-tuning over MPI.")
    parser.add_argument("--version", action="version", version=f"hierfed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{run,launch,sweep,topology}", required=True)
    for command in (run, launch, sweep, topology):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HierfedError as e:
        print(f"hierfed: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
