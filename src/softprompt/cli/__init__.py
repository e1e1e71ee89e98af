"""The ``softprompt`` command line: ``main`` (``cli/app.py``) runs it; ``common`` holds the flags shared by every
part's CLI, the only module of this package that other parts import."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the ``softprompt`` command line (see :func:`softprompt.cli.app.main`)."""
    # Imported on call: the part CLIs that ``cli.app`` lists import ``cli.common``, so this package must not
    # import them while it initialises.
    from .app import main as run

    return run(argv)


__all__ = ["main"]
