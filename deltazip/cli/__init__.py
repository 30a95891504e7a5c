"""`deltazip` command line: each submodule registers its subcommands."""

import argparse
import importlib
import sys

# Modules that define `register(subparsers)`; each subcommand sets `func(args) -> int`.
_COMMAND_MODULES = ("deltazip.cli.serving", "deltazip.cli.compress", "deltazip.cli.security")


def build_parser() -> argparse.ArgumentParser:
    """Parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="deltazip", description="Serve many fine-tunes of one base model.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not an absent command module
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `deltazip` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
