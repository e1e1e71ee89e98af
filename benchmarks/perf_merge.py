#!/usr/bin/env python
"""Merge the JSONs of several ``perf.py`` calls of one session into one results file (issue 18's
``benchmarks/results/perf/perf_eager_<card>.json``): ``results`` concatenated in call order, ``targets`` recomputed
from all rows (a comparison may need rows of two calls), ``meta`` of the first call plus each call's own ``argv``,
``date`` and ``wall_s`` under ``calls``. The calls must have run on one card with one software stack: a merge across
machines or versions would put incomparable rows side by side, so it is refused.

    python benchmarks/perf_merge.py perf_eager_a.json perf_eager_b.json \\
        --out benchmarks/results/perf/perf_eager_h100.json --markdown benchmarks/results/perf/perf_eager_h100.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_report import format_markdown, targets

# What must agree between calls for their rows to be compared.
SAME = ("gpu", "cuda", "torch", "transformers", "peft", "python", "dtype", "softprompt")


def merge(docs: list[dict]) -> dict:
    """One document from several ``perf.py`` documents; raises ValueError when their machines or versions differ,
    or when two calls measured the same (section, model, shape, method)."""
    if not docs:
        raise ValueError("nothing to merge: give at least one perf.py JSON")
    first = docs[0]["meta"]
    for d in docs[1:]:
        diff = {k: (first.get(k), d["meta"].get(k)) for k in SAME if first.get(k) != d["meta"].get(k)}
        if diff:
            raise ValueError(f"calls differ in {diff}: merge only the calls of one machine and software stack")
    rows, seen = [], set()
    for d in docs:
        for r in d["results"]:
            key = (r.get("section"), r.get("model"), r.get("shape"), r.get("method"))
            if key in seen:
                raise ValueError(f"{key} was measured by two calls: keep one of them")
            seen.add(key)
            rows.append(r)
    meta = {k: v for k, v in first.items() if k not in ("argv", "date", "wall_s")}
    meta["calls"] = [{k: d["meta"].get(k) for k in ("argv", "date", "wall_s")} for d in docs]
    return {"meta": meta, "results": rows, "targets": targets(rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="perf.py JSONs, in call order")
    p.add_argument("--out", required=True, help="merged JSON")
    p.add_argument("--markdown", help="also write the merged table here")
    args = p.parse_args(argv)
    try:
        doc = merge([json.loads(Path(x).read_text()) for x in args.inputs])
    except (OSError, ValueError) as e:
        print(f"perf_merge: {e}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(doc["results"]) + "\n")
    print(f"wrote {args.out}: {len(doc['results'])} rows from {len(args.inputs)} call(s), "
          f"{len(doc['targets'])} target(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
