"""Machine-independent paths in recorded results: the device's $OUT and home folders, and this repository's root,
are written as ``$OUT``, ``$HOME`` and ``.`` so that committed result files name no machine's folders."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prefixes() -> list[tuple[str, str]]:
    pairs = [(str(ROOT), "."), (os.path.expanduser("~"), "$HOME")]
    if os.environ.get("OUT"):
        pairs.append((os.environ["OUT"].rstrip("/"), "$OUT"))
    # the longest first: a repository inside the home folder becomes ".", not "$HOME/..."
    return sorted(((p, r) for p, r in pairs if p not in ("", "/")), key=lambda x: -len(x[0]))


def portable(obj):
    """``obj`` (str, or JSON-like lists/dicts of them) with machine folders replaced; other values unchanged."""
    if isinstance(obj, str):
        for prefix, repl in _prefixes():
            obj = obj.replace(prefix, repl)
        return obj
    if isinstance(obj, list):
        return [portable(x) for x in obj]
    if isinstance(obj, tuple):
        return tuple(portable(x) for x in obj)
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    return obj
