"""Where the offline benchmark data lives."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DataNotFoundError

ENV_VAR = "SOFTPROMPT_DATA_DIR"
HUB = "hub"


def _search_from(start: Path) -> Path | None:
    for x in (start, *start.parents):
        cand = x / "shared" / "data"
        if (cand / "README.md").is_file():
            return cand
    return None


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Find the benchmark data directory.

    Order: the ``data_dir`` argument; else the ``SOFTPROMPT_DATA_DIR`` environment variable; else
    ``shared/data`` found by walking up from this package's file and then from the current
    directory (any ancestor ``X`` with ``X/shared/data/README.md``, which covers ``../shared/data``
    beside the repository root). Returns None when nothing is found, meaning "use the Hugging Face
    Hub". Passing (or setting the variable to) ``"hub"`` forces the Hub.

    Raises:
        DataNotFoundError: an explicitly given directory (argument or variable) does not exist.
    """
    for value, origin in ((data_dir, "data_dir"), (os.environ.get(ENV_VAR) or None, ENV_VAR)):
        if value is None:
            continue
        if str(value).strip().lower() == HUB:
            return None
        p = Path(value).expanduser()
        if not p.is_dir():
            raise DataNotFoundError(f"{origin}={str(value)!r} is not a directory")
        return p.resolve()
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        found = _search_from(start)
        if found is not None:
            return found
    return None
