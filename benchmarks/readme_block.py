"""Rewrite one generated block of the README: the lines between a begin marker and an end marker, nothing else
(``fair_readme.py`` and ``dnd_readme.py`` write their results there, so the README's numbers are the JSON's)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def interval(diff: float, ci: list[float]) -> str:
    """A difference with its 95% interval and what the interval says: above or below 0, or within noise."""
    word = "above" if ci[0] > 0 else "below" if ci[1] < 0 else "within noise"
    return f"{diff:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}], {word}"


def update(readme: Path, begin: str, end: str, lines: list[str]) -> bool:
    """Put ``lines`` between the markers; False (and nothing written) when either marker is missing."""
    text = readme.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)
    return True


def main(argv, description: str, results: str, block: Callable[[dict], list[str]], begin: str, end: str,
         make: str) -> int:
    """The scripts' command line: read ``--results`` (default ``results`` under the repo root; ``make`` says how
    to produce it), write ``block(results)`` between the markers of ``--readme``; one-line errors otherwise."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--results", default=str(ROOT / results))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    args = p.parse_args(argv)
    path = Path(args.results)
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run `{make}` first")
    if not update(Path(args.readme), begin, end, block(json.loads(path.read_text()))):
        raise SystemExit(f"{args.readme} has no markers for this block ({begin} ... {end}): add them where it goes")
    return 0
