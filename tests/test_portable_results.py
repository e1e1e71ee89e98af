"""Committed results and docs name no machine's folders: commands are recorded relative to the repository, with
``$HOME`` and ``$OUT`` for the device's folders (``benchmarks/portable.py``)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The folders a machine's absolute paths start with (spelled as alternatives, so this file names none of them).
MACHINE_PATHS = re.compile(r"(?<![\w$.])(/(?:work|root)/|/(?:home|Users)/[\w.-]+/)")


def test_no_absolute_machine_paths_in_results_or_docs():
    tracked = subprocess.run(["git", "ls-files", "benchmarks/results", "docs", "README.md"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".md", ".json", ".jsonl", ".txt", ".csv", ".sh"):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATHS.search(line):
                hits.append(f"{name}:{n}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits[:10])


def test_portable_rewrites_the_repository_home_and_out(monkeypatch):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from portable import portable

    monkeypatch.setenv("OUT", "/somewhere/out")
    cmd = f"python x.py --model {ROOT}/.carry/minilm --export /somewhere/out/a.json --cache {Path.home()}/c"
    assert portable(cmd) == "python x.py --model ./.carry/minilm --export $OUT/a.json --cache $HOME/c"
