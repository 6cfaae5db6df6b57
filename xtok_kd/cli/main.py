"""``xtok-kd``: entry point; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from . import CliError
from . import align as align_cmd
from . import cache_teacher as cache_teacher_cmd
from . import distill as distill_cmd
from . import inspect as inspect_cmd

__all__ = ["main", "build_parser"]

_COMMANDS = {"align": align_cmd, "inspect": inspect_cmd, "cache-teacher": cache_teacher_cmd, "distill": distill_cmd}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xtok-kd", description="Cross-tokenizer knowledge distillation: vocabulary tables, reports, teacher caches and training."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``xtok-kd`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "xtok-kd " + " ".join(shlex.quote(a) for a in argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(_COMMANDS[args.command].run(args))
    except (CliError, OSError, ValueError, ImportError) as err:
        # user errors: bad options, files that cannot be read or written, tables that do not fit; no traceback
        print(f"xtok-kd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xtok-kd {args.command}: interrupted (no partial file is left behind)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
