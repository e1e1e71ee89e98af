"""The ``softprompt`` command line: one explicit table of the parts that add subcommands, one error handler."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..dnd.cli import add_dnd_parser
from ..methods.apt.cli import add_apt_parsers
from ..methods.id_spam.cli import add_id_spam_parsers
from ..represent.cli import add_represent_parser
from ..serve.cli import add_serve_parser
from ..theory.cli import add_theory_parser
from .train import add_train_parsers

# Every part of the package that has subcommands, in the order ``softprompt --help`` lists them.
SUBCOMMANDS = (add_train_parsers, add_apt_parsers, add_id_spam_parsers, add_represent_parser, add_serve_parser,
               add_dnd_parser, add_theory_parser)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="softprompt", description="Adapt a frozen transformer with soft prompts, "
                                     "deep prefixes, gated prefixes and generated prompts.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; known errors print one line and exit 2."""
    # Model aliases are local: never wait for an unreachable Hub. Set here, not at import, so that importing the
    # package changes nothing in the caller's process.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from ..errors import SoftPromptError
    from ..tasks import TaskError

    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SoftPromptError, TaskError, FileNotFoundError) as exc:
        print(f"softprompt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
