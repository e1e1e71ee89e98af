"""Rewrite one generated block of the README: the lines between a begin marker and an end marker, nothing else
(``fair_readme.py`` and ``dnd_readme.py`` write their results there, so the README's numbers are the JSON's)."""

from __future__ import annotations

from pathlib import Path


def update(readme: Path, begin: str, end: str, lines: list[str]) -> bool:
    """Put ``lines`` between the markers; False (and nothing written) when either marker is missing."""
    text = readme.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)
    return True
