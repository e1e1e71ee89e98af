"""Prefix-bank representations (arXiv 2305.13499) on the real MiniLM-L6 and real data.

Three experiments, one script:

1. Source/target: a fixed split (sources SST-2, CoLA, MRPC, STS-B; targets RTE, CB, AG News [+ ARC-Easy and
   OpenBookQA as multiple choice in the full budget]). Target score of probes (logistic regression and a one-hidden-
   layer MLP, early stopping on dev) on four representations: frozen MiniLM, the multi-task fine-tuned encoder, the
   prefix bank with ``concat`` and with ``joint``. Seeds: see BUDGETS (``seed_mode``).
2. Update: add the sources one at a time; target score against cumulative training cost (steps, seconds) for bank
   updates (train one prefix, encode one new block) vs retraining the multi-task encoder on all sources so far and
   re-encoding; PNG.
3. Throughput of R(x) for T = 1, 4, 8 prefixes: one batched pass with per-example prefixes vs T separate passes.

    python benchmarks/prefix_representations.py --budget small --threads 1           # CPU, ~15 min
    python benchmarks/prefix_representations.py --budget full --time-limit 300       # GPU, rerun until "DONE"
    python benchmarks/prefix_representations.py --budget full --stages report        # md + PNG from the results

Every unit of work (one prefix, one multi-task run, one set of probes) writes a small JSON under ``--work`` and is
skipped when rerun, so the full budget can be spread over several time-limited calls. Large files (feature caches,
multi-task encoders) live under ``<work>/scratch`` and are disposable; ``--export DIR`` copies everything else.
The report goes into a section of ``--report`` (one section per budget) plus ``prefix_representations_<budget>.png``
beside it (a smoke run writes both into its ``--work`` folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded from a path
from prefix_representations_budgets import BUDGETS, ROOT

sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # portable.py, also when this file is loaded from a path

from portable import portable
from prefix_representations_bench import Bench, OutOfTime
from prefix_representations_report import device_name, write_section

from softprompt import tasks


def make_data_carry(cfg: dict, dest: Path, data_dir: str | None) -> list[str]:
    """Copy only the data files this budget reads (labelled splits of its sources and targets) into ``dest``."""
    from softprompt.tasks import resolve_data_dir

    root = resolve_data_dir(data_dir)
    copied = []
    for name in list(cfg["sources"]) + list(cfg["targets"]) + ["agnews"]:  # AG News texts feed the throughput run
        spec = tasks.get_task(name)
        splits = {spec.train_split, spec.eval_split, spec.test_split} - set(spec.unlabeled_splits)
        if spec.derivation is not None:
            splits = (splits - set(spec.derived_splits)) | {spec.derivation.source}
        for split in splits:
            for rel in spec.files.get(split, ()):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / rel, dest / rel)
                copied.append(rel)
    return sorted(set(copied))


def export(work: Path, dest: Path) -> None:
    """Pack the small, resumable state (results JSON, trained banks without caches) into one .tar.gz.

    Scratch (feature caches, multi-task encoders) and the untrained control banks are left out: they are
    recomputed when needed. Unpack into the --work folder of the next call to resume there.
    """
    import tarfile

    dest.parent.mkdir(parents=True, exist_ok=True)

    def keep(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        if "cache" in parts or ".manifest.lock" in parts or any(p.startswith(("init-", ".tmp-")) for p in parts):
            return None
        return info

    with tarfile.open(dest, "w:gz") as tar:
        for sub in ("results", "banks"):
            if (work / sub).exists():
                tar.add(work / sub, arcname=sub, filter=keep)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    p.add_argument("--work", help="working folder (default runs/prefrep-<budget>)")
    p.add_argument("--model", default="minilm", help="alias or folder of MiniLM-L6")
    p.add_argument("--data-dir", help="benchmark data (default: $SOFTPROMPT_DATA_DIR or ../shared/data)")
    p.add_argument("--seeds", help="override the budget's seeds, e.g. 0,1,2")
    p.add_argument("--targets", help="override the budget's targets (comma-separated)")
    p.add_argument("--parallel", type=int, help="concurrent `bank add` processes (default: the budget's)")
    p.add_argument("--stages", default="bank,update,main,throughput,report")
    p.add_argument("--time-limit", type=float, help="stop starting new units after this many seconds (resumable)")
    p.add_argument("--report", help="markdown file with one section per budget (default: "
                   "benchmarks/results/prefix_representations.md; for --budget smoke, report.md in --work, so that "
                   "a smoke run leaves the committed results alone)")
    p.add_argument("--export", help="write results + trained banks (no scratch) to this .tar.gz at exit")
    p.add_argument("--keep-encoders", action="store_true", help="keep multi-task encoders under scratch")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--note", help="a sentence added to the report header (e.g. about the machine's load)")
    p.add_argument("--make-data-carry", metavar="DIR",
                   help="only copy the data files this budget needs into DIR (to carry to a GPU machine) and exit")
    args = p.parse_args(argv)
    if args.make_data_carry:
        files = make_data_carry(BUDGETS[args.budget], Path(args.make_data_carry), args.data_dir)
        size = sum((Path(args.make_data_carry) / f).stat().st_size for f in files)
        print(f"{len(files)} files, {size / 2**20:.1f} MiB -> {args.make_data_carry}")
        return 0
    args.work = args.work or str(ROOT / "runs" / f"prefrep-{args.budget}")
    if args.report is None:
        args.report = str(Path(args.work) / "report.md" if args.budget == "smoke"
                          else ROOT / "benchmarks" / "results" / "prefix_representations.md")
    args.command_line = "python benchmarks/prefix_representations.py " + " ".join(argv if argv is not None
                                                                                    else sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    bench = Bench(args)
    bench.scratch.mkdir(parents=True, exist_ok=True)
    if set(args.stages.split(",")) - {"report"}:
        bench.save("run_info", portable({"device": device_name(), "torch": torch.__version__,
                                         "command": args.command_line, "model": args.model}))
    stages = args.stages.split(",")
    status = 0
    try:
        if "bank" in stages:
            bench.build_banks()
        # The update experiment runs first, on an empty feature cache, so that each bank step really encodes only
        # its new block; its last step (all sources) is also the main experiment's result for the first seed.
        if "update" in stages:
            bench.update_experiment()
        if "main" in stages:
            bench.main_experiment()
        if "throughput" in stages:
            bench.throughput()
        if "report" in stages:
            write_section(Path(args.report), args.budget, bench.report())
            bench.log(f"report written to {args.report}")
        print("DONE", flush=True)
    except OutOfTime:
        bench.log("INCOMPLETE: time limit reached; rerun the same command to continue")
        status = 3
    finally:
        if stages != ["report"]:
            wall = bench.result("wall") or {"calls": []}
            wall["calls"].append(round(time.time() - bench.start, 1))
            bench.save("wall", wall)
        if args.export:
            export(bench.work, Path(args.export))
    return status


if __name__ == "__main__":
    sys.exit(main())
