"""The experiments of ``prefix_representations.py``, as one resumable ``Bench``: bookkeeping (one small JSON per unit
of work under ``--work``, the time limit that raises ``OutOfTime``), the target data splits, the prefix banks (trained
one source at a time or in parallel ``softprompt bank add`` processes, plus the untrained control bank), features and
probes, the multi-task encoder, the main and update experiments and the throughput measurement of R(x).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from prefix_representations_budgets import BUDGETS, ROOT
from prefix_representations_report import device_name, make_report

from softprompt import tasks
from softprompt.represent.api import fit_and_score, split_features
from softprompt.represent.bank import PrefixBank, add_task, load_prefix_tables
from softprompt.represent.encoder import PrefixEncoder
from softprompt.represent.features import FeatureSpec, Representer
from softprompt.represent.multitask import MultiTaskConfig, encoder_dir, train_multitask
from softprompt.represent.probe import ProbeConfig, target_splits


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
        from transformers import AutoModelForSequenceClassification

        import softprompt as sp
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
            cmd = [sys.executable, "-m", "softprompt", "bank", "add", "--bank", str(bank.path), "--task", task,
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
            log = open(self.scratch / f"bank-add-{seed}-{task.replace('/', '_')}.log", "w")  # noqa: SIM115
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
