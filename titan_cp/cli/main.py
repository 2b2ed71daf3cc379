"""The ``titan_cp`` console script: ``titan_cp <command> [arguments]`` runs ``titan_cp.cli.<command>.main``."""

from __future__ import annotations

import importlib
import sys

import titan_cp.cli as cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: titan_cp <command> [arguments]   (titan_cp <command> --help for its options)\n")
        print(cli.__doc__.split("\n\n", 1)[1].rstrip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in cli.COMMANDS:
        print(f"titan_cp: unknown command {command!r}; one of: {', '.join(cli.COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(cli.COMMANDS[command]).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
