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
The report goes into a section of ``--report`` (one section per budget) plus ``prefix_representations_<budget>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # portable.py, also when this file is loaded from a path

from portable import portable

from softprompt import tasks  # noqa: E402
from softprompt.represent.api import fit_and_score, split_features  # noqa: E402
from softprompt.represent.bank import PrefixBank, add_task, load_prefix_tables  # noqa: E402
from softprompt.represent.encoder import PrefixEncoder  # noqa: E402
from softprompt.represent.features import FeatureSpec, Representer  # noqa: E402
from softprompt.represent.multitask import MultiTaskConfig, encoder_dir, train_multitask  # noqa: E402
from softprompt.represent.probe import ProbeConfig, target_splits  # noqa: E402

SOURCES = ["glue/sst2", "glue/cola", "glue/mrpc", "glue/stsb"]
BUDGETS: dict[str, dict] = {
    # CPU, 2 cores: every source prefix and the multi-task encoder see a few thousand examples; probes see a few
    # hundred target examples. seed_mode "probe": the bank and the multi-task encoder are trained once (seed 0) and
    # the 3 seeds vary the probes only (training them 3 times does not fit the time budget).
    "small": dict(
        sources=SOURCES, targets=["glue/rte", "superglue/cb", "agnews"], seeds=[0, 1, 2], seed_mode="probe",
        m=10, max_length=48, prefix_steps=40, prefix_bs=16, prefix_lr=5e-2, source_train_limit=2000,
        source_eval_limit=200, mt_steps_per_task=40, mt_bs=16, mt_lr=1e-4, target_train_limit=200,
        target_dev_limit=50, target_test_limit=200, classifiers=["logreg", "mlp"], update_joint=False,
        tp_texts=32, tp_batch=16, tp_T=[1, 4, 8], tp_repeats=1, tp_dtypes=["float32"], parallel=1, bf16=False,
        probe_bs=64,
    ),
    # A seconds-long plumbing check (not a result).
    "smoke": dict(
        sources=SOURCES[:2], targets=["glue/rte", "commonsense/arc_easy"], seeds=[0, 1], seed_mode="probe",
        m=4, max_length=32, prefix_steps=2, prefix_bs=4, prefix_lr=1e-2, source_train_limit=50,
        source_eval_limit=16, mt_steps_per_task=2, mt_bs=4, mt_lr=5e-5, target_train_limit=24,
        target_dev_limit=8, target_test_limit=16, classifiers=["logreg"], update_joint=True,
        tp_texts=8, tp_batch=4, tp_T=[1, 2], tp_repeats=1, tp_dtypes=["float32"], parallel=1, bf16=False,
        probe_bs=64,
    ),
    # GPU: full training sets, 800 steps of batch 32 per source (2.5-14 epochs), every seed retrains everything.
    # About 18 minutes of an H100 in all, spread over calls of --time-limit 300 (see the results file).
    "full": dict(
        sources=SOURCES, targets=["glue/rte", "superglue/cb", "agnews", "commonsense/arc_easy",
                                  "commonsense/openbookqa"],
        seeds=[0, 1, 2], seed_mode="all", m=10, max_length=128, prefix_steps=800, prefix_bs=32, prefix_lr=1e-2,
        source_train_limit=None, source_eval_limit=2000, mt_steps_per_task=800, mt_bs=32, mt_lr=3e-5,
        target_train_limit=None, target_dev_limit=None, target_test_limit=None, classifiers=["logreg", "mlp"],
        update_joint=False, tp_texts=2048, tp_batch=64, tp_T=[1, 4, 8], tp_repeats=2, tp_dtypes=["float32", "bf16"],
        parallel=4, bf16=False, probe_bs=128,
    ),
}
REPS = ("frozen", "multitask", "concat", "joint", "concat-init")
NAMES = {"frozen": "frozen MiniLM", "multitask": "multi-task encoder", "concat": "bank concat",
         "joint": "bank joint", "concat-init": "control: concat of untrained prefixes"}


class OutOfTime(Exception):
    """The --time-limit is reached: stop after the unit in progress; a rerun resumes."""


class Bench:
    def __init__(self, args):
        self.args = args
        self.cfg = dict(BUDGETS[args.budget])
        if args.seeds:
            self.cfg["seeds"] = [int(s) for s in args.seeds.split(",")]
        if args.targets:
            self.cfg["targets"] = args.targets.split(",")
        if args.parallel:
            self.cfg["parallel"] = args.parallel
        self.work = Path(args.work)
        self.results = self.work / "results"
        self.scratch = self.work / "scratch"
        self.results.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._splits: dict[str, tuple] = {}
        self._encoder: PrefixEncoder | None = None

    # ---- bookkeeping ---------------------------------------------------------------------------------------------
    def check_time(self) -> None:
        if self.args.time_limit and time.time() - self.start > self.args.time_limit:
            raise OutOfTime()

    def result(self, name: str) -> dict | None:
        p = self.results / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def save(self, name: str, obj: dict) -> None:
        (self.results / f"{name}.json").write_text(json.dumps(obj, indent=1, default=float))

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.start:7.1f}s] {msg}", flush=True)

    def bank_seeds(self) -> list[int]:
        return self.cfg["seeds"] if self.cfg["seed_mode"] == "all" else [self.cfg["seeds"][0]]

    def train_seed_of(self, probe_seed: int) -> int:
        return probe_seed if self.cfg["seed_mode"] == "all" else self.cfg["seeds"][0]

    def bank(self, seed: int) -> PrefixBank:
        return PrefixBank(self.work / "banks" / f"seed{seed}")

    # ---- data ------------------------------------------------------------------------------------------------------
    def splits(self, target: str):
        if target not in self._splits:
            c = self.cfg
            self._splits[target] = target_splits(target, data_dir=self.args.data_dir,
                                                 train_limit=c["target_train_limit"],
                                                 dev_limit=c["target_dev_limit"], test_limit=c["target_test_limit"])
        return self._splits[target]

    # ---- 1. the banks ----------------------------------------------------------------------------------------------
    def build_banks(self) -> None:
        c = self.cfg
        for seed in self.bank_seeds():
            bank = self.bank(seed)
            have = {e.task for e in bank.entries()} if bank.exists() else set()
            todo = [t for t in c["sources"] if t not in have]
            if not todo:
                continue
            self.check_time()
            if c["parallel"] > 1 and len(todo) > 1:
                self._add_parallel(bank, todo, seed)
            else:
                for task in todo:
                    self.check_time()
                    self.log(f"bank seed {seed}: training prefix for {task}")
                    add_task(bank.path, task, model=self.args.model, num_virtual_tokens=c["m"],
                             max_steps=c["prefix_steps"], batch_size=c["prefix_bs"], lr=c["prefix_lr"],
                             max_length=c["max_length"], train_limit=c["source_train_limit"],
                             eval_limit=c["source_eval_limit"], seed=seed, data_dir=self.args.data_dir,
                             bf16=c["bf16"])
            # Keep the manifest order = the source order of the update experiment.
            with bank.locked() as manifest:
                order = {t: i for i, t in enumerate(c["sources"])}
                manifest["entries"].sort(key=lambda e: order.get(e["task"], 99))
                bank._write(manifest)

    def init_bank(self, seed: int) -> PrefixBank:
        """Control: the same number of prefixes, at initialisation (no source training), distinct init seeds."""
        import softprompt as sp
        from transformers import AutoModelForSequenceClassification

        from softprompt import resources

        bank = PrefixBank(self.work / "banks" / f"init-seed{seed}")
        have = {e.task for e in bank.entries()} if bank.exists() else set()
        for i, task in enumerate(self.cfg["sources"]):
            if task in have:
                continue
            base = AutoModelForSequenceClassification.from_pretrained(resources.resolve(self.args.model),
                                                                      num_labels=2)
            model = sp.wrap(base, sp.PrefixConfig(num_virtual_tokens=self.cfg["m"], seed=1000 * seed + i))
            staging = bank.staging_dir(task)
            model.save_pretrained(str(staging))
            bank.register(staging, task=task, model=self.args.model, max_length=self.cfg["max_length"],
                          metrics={"steps": 0, "train_seconds": 0.0})
        return bank

    def _add_parallel(self, bank: PrefixBank, todo: list[str], seed: int) -> None:
        """One `softprompt bank add` process per source (the bank's lock serialises their manifest updates)."""
        c = self.cfg
        self.log(f"bank seed {seed}: training {todo} in {min(c['parallel'], len(todo))} parallel processes")
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs = []
        for task in todo:
            cmd = [sys.executable, "-m", "softprompt.cli", "bank", "add", "--bank", str(bank.path), "--task", task,
                   "--model", self.args.model, "--num-virtual-tokens", str(c["m"]), "--max-steps",
                   str(c["prefix_steps"]), "--batch-size", str(c["prefix_bs"]), "--lr", str(c["prefix_lr"]),
                   "--max-length", str(c["max_length"]), "--seed", str(seed)]
            for flag, key in (("--train-limit", "source_train_limit"), ("--eval-limit", "source_eval_limit")):
                if c[key]:
                    cmd += [flag, str(c[key])]
            if self.args.data_dir:
                cmd += ["--data-dir", self.args.data_dir]
            if c["bf16"]:
                cmd += ["--bf16"]
            while sum(p.poll() is None for p in procs) >= c["parallel"]:
                time.sleep(1)
            log = open(self.scratch / f"bank-add-{seed}-{task.replace('/', '_')}.log", "w")
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        codes = [p.wait() for p in procs]
        if any(codes):
            for task, code in zip(todo, codes):
                if code:  # show why (the logs stay on the machine that ran them)
                    log = (self.scratch / f"bank-add-{seed}-{task.replace('/', '_')}.log").read_text()
                    print(f"--- bank add {task} (exit {code}), last lines:\n" + "\n".join(log.splitlines()[-25:]))
            raise RuntimeError(f"bank add failed ({codes}); see {self.scratch}/bank-add-*.log")

    # ---- features + probes -----------------------------------------------------------------------------------------
    def representer(self, spec: FeatureSpec, cache: str) -> Representer:
        chunk = 256 if self.device == "cuda" else 64  # texts per forward (x T rows under concat)
        rep = Representer(spec, cache_dir=self.scratch / "cache" / cache, device=self.device, batch_size=chunk,
                          progress=not self.args.no_progress)
        if spec.kind != "encoder":
            if self._encoder is None:
                self._encoder = PrefixEncoder(self.args.model, device=self.device, max_length=self.cfg["max_length"],
                                              batch_size=chunk, progress=not self.args.no_progress)
            rep.share_encoder(self._encoder)
        return rep

    def probes(self, tag: str, spec: FeatureSpec, cache: str, probe_seeds: list[int],
               classifiers: list[str] | None = None, force: bool = False) -> dict:
        """Encode every target (cache first) and fit probes; returns {"encode": cost, "scores": ...}.

        ``force``: run even past the time limit (the multi-task encoder just trained would be lost otherwise).
        """
        classifiers = classifiers or self.cfg["classifiers"]
        done = self.result(f"probe__{tag}")
        if done is not None:
            return done
        if not force:
            self.check_time()
        self.log(f"probes {tag}")
        rep = self.representer(spec, cache)
        out: dict = {"scores": {}, "dev": {}, "encode": {}, "feature_dim": None}
        for target in self.cfg["targets"]:
            info, splits, how = self.splits(target)
            rows0, sec0 = rep.stats.rows, rep.stats.seconds
            feats = split_features(rep, splits)
            out["encode"][target] = {"rows": rep.stats.rows - rows0, "seconds": round(rep.stats.seconds - sec0, 2),
                                     "texts": sum(len(s.texts) for s in splits.values())}
            out["feature_dim"] = int(feats["train"].shape[1])
            for clf in classifiers:
                for seed in probe_seeds:
                    _, m = fit_and_score(info, splits, feats, ProbeConfig(classifier=clf, seed=seed,
                                                                         batch_size=self.cfg["probe_bs"]))
                    out["scores"].setdefault(clf, {}).setdefault(target, {})[str(seed)] = m["main"]
                    out["dev"].setdefault(clf, {}).setdefault(target, {})[str(seed)] = m["dev_main"]
            out.setdefault("splits", {})[target] = how
        out["layout"] = rep.layout
        self.save(f"probe__{tag}", out)
        return out

    def multitask(self, sources: list[str], seed: int) -> tuple[dict, str | None]:
        """Train (or reuse the record of) a multi-task encoder on ``sources``; returns (metrics, encoder dir)."""
        c = self.cfg
        name = f"mt__k{len(sources)}__seed{seed}"
        out = self.scratch / name
        done = self.result(name)
        if done is not None:
            return done, (encoder_dir(out) if (out / "encoder").exists() else None)
        self.check_time()
        self.log(f"multi-task encoder on {sources} (seed {seed})")
        m = train_multitask(MultiTaskConfig(
            tasks=sources, output=str(out), model=self.args.model, steps_per_task=c["mt_steps_per_task"],
            batch_size=c["mt_bs"], lr=c["mt_lr"], max_length=c["max_length"], train_limit=c["source_train_limit"],
            eval_limit=c["source_eval_limit"], seed=seed, data_dir=self.args.data_dir, bf16=c["bf16"],
            progress=not self.args.no_progress))
        self.save(name, m)
        return m, encoder_dir(out)

    def mt_probes(self, sources: list[str], seed: int, probe_seeds: list[int], tag: str,
                  classifiers: list[str] | None = None) -> dict:
        done = self.result(f"probe__{tag}")
        if done is not None:
            return done
        self.check_time()
        _, enc = self.multitask(sources, seed)
        if enc is None:  # the encoder was deleted (or lost with a cold machine): retrain it
            (self.results / f"mt__k{len(sources)}__seed{seed}.json").unlink()
            _, enc = self.multitask(sources, seed)
        spec = FeatureSpec("encoder", encoder=enc, pool="cls", max_length=self.cfg["max_length"])
        res = self.probes(tag, spec, f"mt-k{len(sources)}-seed{seed}", probe_seeds, classifiers, force=True)
        if not self.args.keep_encoders:
            shutil.rmtree(Path(enc).parent, ignore_errors=True)
        return res

    # ---- 2. main experiment ----------------------------------------------------------------------------------------
    def main_experiment(self) -> None:
        seeds = self.cfg["seeds"]
        frozen = FeatureSpec("frozen", model=self.args.model, pool="cls", max_length=self.cfg["max_length"])
        self.probes("frozen", frozen, "frozen", seeds)
        for b in self.bank_seeds():
            probe_seeds = [s for s in seeds if self.train_seed_of(s) == b]
            bank = str(self.bank(b).path)
            for kind in ("concat", "joint"):
                spec = FeatureSpec(kind, bank=bank, pool="cls", max_length=self.cfg["max_length"])
                self.probes(f"{kind}__seed{b}", spec, f"bank{b}", probe_seeds)
            self.mt_probes(self.cfg["sources"], b, probe_seeds, f"multitask__seed{b}")
            if self.result(f"probe__concat-init__seed{b}") is None:
                self.check_time()
                spec = FeatureSpec("concat", bank=str(self.init_bank(b).path), pool="cls",
                                   max_length=self.cfg["max_length"])
                self.probes(f"concat-init__seed{b}", spec, f"init{b}", probe_seeds)

    # ---- 3. update experiment --------------------------------------------------------------------------------------
    def update_experiment(self) -> None:
        b = self.bank_seeds()[0]
        seeds = [s for s in self.cfg["seeds"] if self.train_seed_of(s) == b]
        sources = self.cfg["sources"]
        bank = str(self.bank(b).path)
        for k in range(1, len(sources) + 1):
            first = sources[:k]
            kinds = ("concat", "joint") if self.cfg["update_joint"] else ("concat",)
            for kind in kinds:
                tag = f"{kind}__seed{b}" if k == len(sources) else f"update-{kind}-k{k}__seed{b}"
                spec = FeatureSpec(kind, bank=bank, entries=first, pool="cls", max_length=self.cfg["max_length"])
                self.probes(tag, spec, f"bank{b}", seeds)
            tag = f"multitask__seed{b}" if k == len(sources) else f"update-multitask-k{k}__seed{b}"
            self.mt_probes(first, b, seeds, tag, classifiers=["logreg"] if k < len(sources) else None)

    # ---- 4. throughput ---------------------------------------------------------------------------------------------
    def throughput(self) -> None:
        if self.result("throughput") is not None:
            return
        self.check_time()
        c = self.cfg
        self.log("throughput")
        recs = tasks.load_split("agnews", "train", self.args.data_dir)
        texts = [(r["text"], None) for r in recs[: c["tp_texts"]]]
        bank = self.bank(self.bank_seeds()[0])
        tables = [load_prefix_tables(bank.adapter_dir(e)) for e in bank.entries()]
        rows = []
        for dtype_name in c["tp_dtypes"]:
            dtype = {"float32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            enc = PrefixEncoder(self.args.model, device=self.device, dtype=dtype, max_length=c["max_length"],
                                batch_size=c["tp_batch"], progress=False)
            rows += self._throughput_rows(enc, texts, tables, dtype_name)
            enc = None  # free the model before loading the next dtype
        self.save("throughput", {"rows": rows, "texts": len(texts), "texts_per_chunk": c["tp_batch"],
                                 "max_length": c["max_length"], "repeats": c["tp_repeats"], "device": device_name()})

    def _throughput_rows(self, enc: PrefixEncoder, texts: list, tables: list, dtype_name: str) -> list[dict]:
        c = self.cfg
        enc.encode_concat(texts[: c["tp_batch"]], tables[:1])  # warm-up (kernels, allocator)

        def best(fn) -> float:
            times = []
            for _ in range(c["tp_repeats"]):
                if self.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if self.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return min(times)

        n = len(texts)
        rows = [{"dtype": dtype_name, "T": 0, "mode": "no prefix", "texts_per_s": n / best(
            lambda: enc.encode_plain(texts))}]
        for t in c["tp_T"]:
            prefixes = [tables[i % len(tables)] for i in range(t)]  # speed does not depend on the values
            for mode, fn in (("batched per-example", enc.encode_concat), ("T separate passes", enc.encode_separate),
                             ("joint (one pass, T*m prefix)", enc.encode_joint)):
                sec = best(lambda fn=fn, prefixes=prefixes: fn(texts, prefixes))
                rows.append({"dtype": dtype_name, "T": t, "mode": mode, "texts_per_s": n / sec})
        return rows

    # ---- 5. report -------------------------------------------------------------------------------------------------
    def report(self) -> str:
        return make_report(self)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
           f"{torch.get_num_threads()})"


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.array(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    m, s = _mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def collect_main(bench: Bench, clf: str) -> dict[str, dict[str, list[float]]]:
    """rep -> target -> scores over seeds (each probe seed reads the bank/MT of its training seed)."""
    table: dict[str, dict[str, list[float]]] = {r: {} for r in REPS}
    for seed in bench.cfg["seeds"]:
        b = bench.train_seed_of(seed)
        for rep in REPS:
            res = bench.result("probe__frozen" if rep == "frozen" else f"probe__{rep}__seed{b}")
            if res is None or clf not in res["scores"]:
                continue
            for target, per_seed in res["scores"][clf].items():
                if str(seed) in per_seed:
                    table[rep].setdefault(target, []).append(per_seed[str(seed)])
    return table


def collect_update(bench: Bench) -> list[dict]:
    """One row per (representation, k): cumulative steps/seconds and the mean target score (logreg).

    Costs accumulate over every step up to k, so a representation is listed only while it was measured at every k.
    """
    b = bench.bank_seeds()[0]
    sources = bench.cfg["sources"]
    bank = bench.bank(b)
    entries = {e.task: e for e in bank.entries()} if bank.exists() else {}
    rows = []
    for rep in ("concat", "joint", "multitask"):
        steps, seconds = 0, 0.0
        for k in range(1, len(sources) + 1):
            last = k == len(sources)
            res = bench.result(f"probe__{rep}__seed{b}" if last else f"probe__update-{rep}-k{k}__seed{b}")
            mt = bench.result(f"mt__k{k}__seed{b}")
            e = entries.get(sources[k - 1])
            if res is None or (rep == "multitask" and mt is None) or (rep != "multitask" and e is None):
                break
            enc_sec = sum(v["seconds"] for v in res["encode"].values())
            if rep == "multitask":  # retrain on all sources so far, re-encode the corpus
                steps += mt["steps"]
                seconds += mt["train_seconds"] + enc_sec
            else:  # train one new prefix; concat encodes only the new block (cache), joint re-encodes
                steps += e.steps
                seconds += e.train_seconds + enc_sec
            per_target = {t: float(np.mean(list(v.values()))) for t, v in res["scores"]["logreg"].items()}
            rows.append({"rep": rep, "k": k, "added": sources[k - 1], "cum_steps": steps,
                         "cum_seconds": round(seconds, 1), "encode_seconds": round(enc_sec, 1),
                         "encode_rows": sum(v["rows"] for v in res["encode"].values()),
                         "mean_score": float(np.mean(list(per_target.values()))), "per_target": per_target})
    rows.sort(key=lambda r: (r["k"], r["rep"]))
    return rows


def plot_update(rows: list[dict], frozen: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"concat": ("bank concat (add one prefix)", "o-"),
             "joint": ("bank joint (add one prefix, re-encode)", "s--"),
             "multitask": ("multi-task (retrain on all, re-encode)", "^-")}
    for ax, key, label in ((axes[0], "cum_steps", "cumulative training steps"),
                           (axes[1], "cum_seconds", "cumulative seconds (training + encoding)")):
        for rep, (name, fmt) in style.items():
            pts = [r for r in rows if r["rep"] == rep]
            if not pts:
                continue
            ax.plot([p[key] for p in pts], [100 * p["mean_score"] for p in pts], fmt, label=name)
            for p in pts:
                ax.annotate(f"+{p['added'].split('/')[-1]}", (p[key], 100 * p["mean_score"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 4))
        if frozen is not None:
            ax.axhline(100 * frozen, color="grey", ls=":", label="frozen MiniLM")
        ax.set_xlabel(label)
        ax.set_ylabel("mean target score (logreg probe)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_report(bench: Bench) -> str:
    c, args = bench.cfg, bench.args
    lines = []
    budget = args.budget
    lines.append(f"## Budget `{budget}`" + (" (small-budget CPU run)" if budget == "small" else ""))
    lines.append("")
    # The machine that measured (the report may be regenerated elsewhere with --stages report).
    info = bench.result("run_info") or {"device": device_name(), "torch": torch.__version__,
                                        "command": args.command_line}
    calls = (bench.result("wall") or {}).get("calls", [])
    total = sum(calls) + (0 if args.stages == "report" else time.time() - bench.start)
    lines.append(f"Command: `{info['command']}`  ")
    lines.append(f"Device: {info['device']}; torch {info['torch']}; wall time {total:.0f} s over "
                 f"{len(calls) + (0 if args.stages == 'report' else 1)} call(s) of the script.  ")
    if args.note:
        lines.append(f"Note: {args.note}  ")
    lines.append(f"Model: `{info.get('model', args.model)}` (MiniLM-L6-H384). Sources: {', '.join(c['sources'])}. "
                 f"Targets: {', '.join(c['targets'])}.  ")
    lims = (c["target_train_limit"], c["target_dev_limit"], c["target_test_limit"])
    lines.append(
        f"Source prefixes: m={c['m']} virtual tokens per layer, {c['prefix_steps']} steps of batch {c['prefix_bs']}, "
        f"lr {c['prefix_lr']}, max length {c['max_length']}, source training data "
        f"{'subsampled to ' + str(c['source_train_limit']) if c['source_train_limit'] else 'full'}. "
        f"Multi-task encoder: "
        f"{c['mt_steps_per_task']} steps per source task (batch {c['mt_bs']}, lr {c['mt_lr']}, full fine-tuning, mixed "
        f"batches, one linear head per task). Probes: features standardised, AdamW lr 1e-3, batch {c['probe_bs']}, "
        f"early stopping on dev "
        f"(patience 15); target train/dev/test limited to {lims} examples (None = all). Pooling: [CLS] of the last "
        f"layer. Seeds {c['seeds']}: "
        + ("the bank and the multi-task encoder are trained once (seed 0); the seeds vary the probes only."
           if c["seed_mode"] == "probe" else "each seed retrains the bank, the multi-task encoder and the probes."))
    lines.append("")
    # Source quality (sanity): prefix eval metrics from the manifest, multi-task heads.
    bank = bench.bank(bench.bank_seeds()[0])
    if bank.exists():
        mt = bench.result(f"mt__k{len(c['sources'])}__seed{bench.bank_seeds()[0]}")
        lines.append("Source tasks (seed of the first bank; main metric on the source dev split, "
                     f"{'subsampled' if c['source_eval_limit'] else 'full'}):")
        lines.append("")
        lines.append("| source | prefix (frozen encoder) | steps | seconds | multi-task head |")
        lines.append("|---|---|---|---|---|")
        for e in bank.entries():
            main = e.metrics.get("eval_main", e.metrics.get("eval_" + tasks.get_task(e.task).metric))
            mtv = (mt or {}).get("eval", {}).get(e.task)
            lines.append(f"| {e.task} | {main:.3f} | {e.steps} | {e.train_seconds:.0f} | "
                         f"{'' if mtv is None else f'{mtv:.3f}'} |")
        if mt:
            lines.append(f"\nMulti-task encoder: {mt['steps']} steps, {mt['train_seconds']:.0f} s.")
        lines.append("")
    # Main table.
    verdicts = []
    for clf in c["classifiers"]:
        table = collect_main(bench, clf)
        lines.append(f"### Target tasks, {clf} probe (test score × 100, mean ± std over {len(c['seeds'])} seeds)")
        lines.append("")
        lines.append("| target | metric | " + " | ".join(NAMES[r] for r in REPS) + " |")
        lines.append("|---|---|" + "---|" * len(REPS))
        for t in c["targets"]:
            metric = tasks.get_task(t).metric
            lines.append(f"| {t} | {metric} | " + " | ".join(_fmt(table[r].get(t, [])) for r in REPS) + " |")
        avg = {}
        for r in REPS:
            per_seed = [np.mean([table[r][t][i] for t in c["targets"]]) for i in range(len(c["seeds"]))
                        if all(t in table[r] and len(table[r][t]) > i for t in c["targets"])]
            avg[r] = per_seed
        lines.append("| **average** | | " + " | ".join(f"**{_fmt(avg[r])}**" for r in REPS) + " |")
        lines.append("")
        # Sampling noise of the test sets: binomial standard error at p = 0.5 (an upper bound for accuracy) per
        # target, averaged over targets; a difference of two averages is "clear" beyond 2 * sqrt(2) of it.
        frozen_res = bench.result("probe__frozen") or {}
        n_test = [frozen_res.get("splits", {}).get(t, {}).get("n_test") for t in c["targets"]]
        se = (float(np.sqrt(sum(0.25 / n for n in n_test))) / len(n_test)) if all(n_test) else None
        for rep, other in (("concat", "multitask"), ("joint", "multitask"), ("concat", "concat-init"),
                           ("concat", "frozen")):
            if not avg[rep] or not avg[other]:
                continue
            d = 100 * (np.mean(avg[rep]) - np.mean(avg[other]))
            wins = sum(np.mean(table[rep][t]) > np.mean(table[other][t]) for t in c["targets"])
            clear = se is None or abs(d) > 100 * 2 * np.sqrt(2) * se
            verdicts.append(f"{clf} probe: {NAMES[rep]} {'beats' if d > 0 else 'does not beat'} {NAMES[other]} on "
                            f"the average over unseen targets ({d:+.1f} points; better on {wins} of "
                            f"{len(c['targets'])} targets)"
                            + ("" if clear else f"; within test-set noise (2·√2·SE = "
                                                f"{100 * 2 * np.sqrt(2) * se:.1f} points)"))
    # Update experiment.
    rows = collect_update(bench)
    if rows:
        frozen = collect_main(bench, "logreg")["frozen"]
        frozen_avg = float(np.mean([np.mean(v) for v in frozen.values()])) if frozen else None
        png = Path(args.report).parent / f"prefix_representations_{budget}.png"
        try:
            plot_update(rows, frozen_avg, png, f"Update experiment ({budget} budget, {info['device']})")
        except ImportError:
            bench.log("matplotlib is not installed: no PNG (pip install matplotlib, then rerun --stages report)")
        lines.append("### Update experiment (sources added one at a time; logreg probe; mean over targets)")
        lines.append("")
        lines.append(f"![update experiment]({png.name})")
        lines.append("")
        lines.append("| representation | k | added | cumulative steps | cumulative seconds | encoded rows at this "
                     "step | mean target score |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in rows:
            lines.append(f"| {NAMES[r['rep']]} | {r['k']} | {r['added']} | {r['cum_steps']} | {r['cum_seconds']:.0f} "
                         f"| {r['encode_rows']} | {100 * r['mean_score']:.1f} |")
        lines.append("")
        lines.append("Costs: a bank update trains one prefix and (concat) encodes only the new block for the target "
                     "corpus (the cached blocks are reused: see the encoded rows); joint re-encodes the corpus once; "
                     "the multi-task baseline retrains on all sources added so far and re-encodes the corpus.")
        lines.append("")
    # Throughput.
    tp = bench.result("throughput")
    if tp:
        lines.append(f"### Throughput of R(x) ({tp['device']}; {tp['texts']} AG News texts, max length "
                     f"{tp['max_length']}, {tp['texts_per_chunk']} texts per chunk, best of {tp['repeats']})")
        lines.append("")
        lines.append("| dtype | T | mode | texts/s |")
        lines.append("|---|---|---|---|")
        for r in tp["rows"]:
            lines.append(f"| {r['dtype']} | {r['T']} | {r['mode']} | {r['texts_per_s']:.1f} |")
        lines.append("")
    if verdicts:
        lines.append("### Verdict")
        lines.append("")
        lines += [f"- {v}." for v in verdicts]
        lines.append("")
        if budget == "small":
            lines.append(
                "Caveat: this is a smoke-scale CPU run. Each source prefix and the multi-task encoder see "
                f"{c['prefix_steps']} steps of {c['prefix_bs']} examples per source (see the source table: some "
                "prefixes are near chance on their own task), the seeds vary only the probes, and the test sets are "
                f"at most {c['target_test_limit']} examples. It checks the pipeline and the cost accounting; it cannot "
                "confirm or refute the paper's claim. The full budget (GPU) is the experiment.")
            lines.append("")
    return "\n".join(lines)


def write_section(report: Path, budget: str, body: str) -> None:
    """Replace this budget's section of the report (other budgets' sections are kept)."""
    start, end = f"<!-- budget:{budget} -->", f"<!-- /budget:{budget} -->"
    text = report.read_text() if report.exists() else (
        "# Prefix-bank representations: results\n\n"
        "Written by `benchmarks/prefix_representations.py` (one section per budget). See "
        "`docs/prefix_representations.md` for the method.\n\n")
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)


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
    p.add_argument("--report", default=str(ROOT / "benchmarks" / "results" / "prefix_representations.md"))
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
