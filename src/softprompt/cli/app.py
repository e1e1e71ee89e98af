"""The ``softprompt`` command line: one explicit table of the parts that add subcommands, one error handler."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..dnd.cli import add_dnd_parser
from ..errors import ConfigError, SoftPromptError
from ..methods.apt.cli import add_apt_parsers
from ..methods.id_spam.cli import add_id_spam_parsers
from ..represent.cli import add_represent_parser
from ..serve.cli import add_serve_parser
from ..tasks import TaskError
from ..theory.cli import add_theory_parser
from .train import add_train_parsers

# Every part of the package that has subcommands, in the order ``softprompt --help`` lists them.
SUBCOMMANDS = (add_train_parsers, add_apt_parsers, add_id_spam_parsers, add_represent_parser, add_serve_parser,
               add_dnd_parser, add_theory_parser)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="softprompt", description="Adapt a frozen transformer with soft prompts, "
                                     "deep prefixes, gated prefixes and generated prompts.")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Errors print one line (``--debug``: the traceback): exit 2 for usage and configuration
    errors, 1 for runtime errors (data, adapters, models, files), 130 for Ctrl-C."""
    # Model aliases are local: never wait for an unreachable Hub. Set here, not at import, so that importing the
    # package changes nothing in the caller's process.
    if "HF_HUB_OFFLINE" not in os.environ:
        os.environ["HF_HUB_OFFLINE"] = "1"
        # huggingface_hub read the variable when it was imported (with the package): tell it too.
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = [a for a in argv if a != "--debug"]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"softprompt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place that turns any error into one line
        if args.debug:
            raise
        code = 2 if isinstance(exc, ConfigError) else 1
        print(f"softprompt {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return code


def one_line(exc: BaseException) -> str:
    """An error as one line: known errors say what to do; anything else is named, with where to see more."""
    known = (SoftPromptError, TaskError, OSError, ValueError, KeyError)
    text = " ".join(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).split())
    if not isinstance(exc, known) or not text:
        text = f"{type(exc).__name__}: {text or 'no message'} (run with --debug for the traceback)"
    return text[:1000]


if __name__ == "__main__":
    sys.exit(main())
