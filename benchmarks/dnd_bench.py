#!/usr/bin/env python
"""Drag-and-Drop on SmolLM2-135M-Instruct: leave-one-dataset-out benchmark, resumable by stages (docs/dnd_gpu.md).

Subcommands
-----------
``convert --gguf FILE --out DIR``   GGUF -> HF folder once (the steps of ``softprompt.resources.ensure_smollm2``,
                                    from a given GGUF path).
``run --state DIR [...]``           run the pending stages that fit in ``--time-budget`` seconds; everything is kept
                                    under ``--state``; ``--export DIR`` writes the results after every stage.
``export --state DIR --out DIR``    results JSON + markdown + a small tar of logs.
``report --results JSON [--out MD]`` markdown from a results JSON (benchmarks/results/dnd.md).
``plan --state DIR``                the stages, which are done, and the time estimates.
``cloze --state DIR --model M``     issue 21, cloze format: base scores, the zoo gate per config, cross-dataset LoRA
                                    scores (``softprompt.dnd.study``); ``--export`` writes dnd_cloze_stages.json.
                                    With ``--generators``: the leave-one-out gen/dnd stages, ``--gen-group K`` side by
                                    side, none started that cannot finish within ``--session-left`` seconds.
``cloze-report --stages JSON``      benchmarks/results/dnd_cloze.json and dnd.md from exported stage results.
``gen-bench``                       seconds per generator step, 1 or K side by side, on random data (no zoo).
``boolq-probe``                     BoolQ base skill (AUC, balanced accuracy) per faithful cloze format, zoo part.

Stages, in order (each persisted as ``state/stages/<name>.json`` when complete; an interrupted stage is redone):

* ``base``           the base model on every dataset's fixed evaluation subset (both measures).
* ``zoo:<d>``        one LoRA for dataset d from the shared init (warm-up + kept checkpoints; ``curve_steps`` also
                     saved), its checkpoints tokenised once, its final checkpoint scored on every dataset and its
                     training curve scored on d.
* ``gen:<h>``        generator trained on the zoo without h (conditions: unlabeled prompts); adapters generated
                     from h's prompts (``samples`` draws, seeds 0..), the zoo-mean (A, B) baseline, the
                     number-of-prompts ablation, generation timings and distances to the zoo.
* ``ans:<h>``        the same generator recipe with prompt + answer conditions (ablation), scored on h.

The configuration (sizes) is frozen in ``state/config.json`` at the first ``run``; later runs reuse it.
A stage starts only if its estimated duration (the longest measured stage of its kind, else ``--priors``) fits in
what is left of ``--time-budget``; the run then stops cleanly, and the next ``run`` continues.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tarfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/portable.py, also when loaded from a path
from portable import portable

T_START = time.time()

SHORT = {"commonsense/arc_easy": "arc_easy", "commonsense/arc_challenge": "arc_challenge",
         "superglue/boolq": "boolq", "commonsense/hellaswag": "hellaswag", "commonsense/piqa": "piqa",
         "commonsense/winogrande": "winogrande", "commonsense/openbookqa": "openbookqa"}

# Sizes of the experiment (frozen in state/config.json at the first run). Defaults: the H100 plan of docs/dnd_gpu.md.
DEFAULTS: dict = {
    "model": None,                     # HF folder of the base model (required at the first run)
    "encoder": "minilm",               # condition encoder: alias or HF folder
    "datasets": ",".join(SHORT.values()),
    "eval_n": 500,                     # evaluated test examples per dataset (sha256-ranked, fixed)
    "min_pool": 128,                   # held-out prompts come from the rest of the test part if at least this many
    "heldout_pool": 1000,              # max condition prompts of a held-out dataset
    "train_pool": 1000,                # max condition prompts per training dataset (its zoo part)
    "rank": 8, "targets": "all", "warmup_steps": 75, "checkpoints": 50, "zoo_lr": 1e-4, "zoo_batch": 32,
    "max_length": 512, "train_limit": 0, "init_seed": 42, "data_seed": 0,
    "curve_steps": "5,10,20,40,75,100",  # training-curve points scored for the cost comparison (+ the final step)
    "n_prompts": 32, "cond_length": 128, "gen_steps": 800, "gen_batch": 8, "gen_lr": 1e-3, "gen_warmup": 50,
    "gen_weight_decay": 0.1, "width": 64, "n_layers": 4, "kernel": 5, "chunk": 192, "target": "ab",
    "stats_code": "relative", "gen_seed": 0,
    "samples": 5,                      # generated adapters per held-out dataset (prompt draws, seeds 0..samples-1)
    "prompt_counts": "4,16,64",        # ablation: distinct condition prompts at generation time
    "ablation_samples": 2,
    "answer_datasets": "arc_challenge,boolq,winogrande",  # prompt+answer ablation ("all", "none" or a list)
    "measures": "loglik,gen",          # main table (base, train LoRAs, zoo mean, DnD draws, own LoRA)
    "curve_measures": "loglik",        # training-curve points of the cost comparison
    "ablation_measures": "loglik,gen",  # number-of-prompts ablation
    "max_new_tokens": 8,
}
INT_KEYS = {"eval_n", "min_pool", "heldout_pool", "train_pool", "rank", "warmup_steps", "checkpoints", "zoo_batch",
            "max_length", "train_limit", "init_seed", "data_seed", "n_prompts", "cond_length", "gen_steps",
            "gen_batch", "gen_warmup", "width", "n_layers", "kernel", "chunk", "gen_seed", "samples",
            "ablation_samples", "max_new_tokens"}
FLOAT_KEYS = {"zoo_lr", "gen_lr", "gen_weight_decay"}
# Seconds per stage kind on one H100 with the defaults (used until a stage of that kind has been measured).
PRIORS = {"base": 30.0, "zoo": 60.0, "gen": 100.0, "ans": 80.0}
KIND_TITLES = {"base": "base model evaluation (all datasets)", "zoo": "LoRA zoo for one dataset (+ its scores)",
               "gen": "generator + generated adapters + ablation (one held-out dataset)",
               "ans": "prompt+answer generator (one held-out dataset)"}


def log(msg: str, state: Path | None = None) -> None:
    line = f"[{time.time() - T_START:7.1f}s] {msg}"
    print(line, flush=True)
    if state is not None:
        with open(state / "log.txt", "a") as f:
            f.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {line}\n")


def write_json(path: Path, obj) -> None:
    """Atomic JSON write."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def sha_rank(key: str, n: int) -> list[int]:
    """Indices 0..n-1 ordered by sha256(f"{key}|{i}") (deterministic, file-order independent)."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{key}|{i}".encode()).hexdigest())


def short(d: str) -> str:
    return SHORT.get(d, d.replace("/", "__"))


def env_info() -> dict:
    import peft
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = f"{torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores)"
    return info


# ----------------------------------------------------------------------------------------------- GGUF conversion
def convert(gguf: Path, out: Path) -> Path:
    """GGUF -> HF folder (fp32, dequantised), as ``softprompt.resources.ensure_smollm2`` but from ``gguf``.
    Idempotent; written next to ``out`` and renamed, so an interrupted conversion leaves no half folder."""
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        print(f"{out} exists; nothing to do")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    ids = tok("The capital of Italy is", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        gen = lm.generate(**ids, max_new_tokens=3, do_sample=False)
    print(f"converted {gguf} -> {out} in {time.time() - t0:.1f} s; first token id {int(ids['input_ids'][0, 0])}; "
          f"'The capital of Italy is' -> {tok.decode(gen[0, ids['input_ids'].shape[1]:])!r}")
    return out


# ----------------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """The base model, with LoRA deltas merged into its weights on demand (scale·B·A added to a kept copy of each
    touched weight and removed again), so every adapter is scored at the plain model's speed."""

    def __init__(self, model_dir: str, device: str, batch_size: int, measures: tuple[str, ...], max_new_tokens: int):
        from softprompt.dnd.harness import load_model

        self.model, self.tok = load_model(model_dir, device=device)
        self.device, self.batch_size, self.measures, self.max_new_tokens = device, batch_size, measures, max_new_tokens
        self.orig: dict = {}

    def clear(self) -> None:
        for name, w in self.orig.items():
            self.model.get_submodule(name).weight.data.copy_(w)

    def set_adapter(self, state: dict, scale: float) -> None:
        import torch

        from softprompt.dnd.tokenizer import lora_modules

        self.clear()
        for prefix in lora_modules(state):
            name = prefix.removeprefix("base_model.model.")
            w = self.model.get_submodule(name).weight
            if name not in self.orig:
                self.orig[name] = w.detach().clone()
            a = state[prefix + ".lora_A.weight"].to(self.device, torch.float32)
            b = state[prefix + ".lora_B.weight"].to(self.device, torch.float32)
            w.data.copy_((self.orig[name].float() + scale * (b @ a)).to(w.dtype))

    def score(self, items, state: dict | None = None, scale: float = 1.0, measures: tuple[str, ...] | None = None
              ) -> dict:
        from softprompt.dnd.harness import evaluate_items

        if state is None:
            self.clear()
        else:
            self.set_adapter(state, scale)
        res = evaluate_items(self.model, self.tok, items, self.batch_size, measures or self.measures,
                             self.max_new_tokens, progress=False)
        return {k: res[k] for k in ("n", "loglik_acc", "gen_acc", "gen_invalid") if k in res}


def answer_text(dataset: str, rec: dict) -> str:
    from softprompt.dnd.templates import LETTERS, YES_NO

    lab = int(rec["label"])
    if dataset == "superglue/boolq":
        return YES_NO[lab]
    return f"{LETTERS[lab]}. {str(rec['choices'][lab]).strip()}"


def condition_text(dataset: str, rec: dict, with_answer: bool) -> str:
    """The generator's condition for one record: the plain instruction text (no chat template), plus
    ``"\\nAnswer: <gold>"`` for the prompt+answer ablation."""
    from softprompt.dnd.templates import user_message

    text = user_message(dataset, rec)[0]
    return f"{text}\nAnswer: {answer_text(dataset, rec)}" if with_answer else text


# --------------------------------------------------------------------------------------------------------- bench
class Bench:
    def __init__(self, state: Path, cfg: dict, rt: dict):
        import torch

        from softprompt.dnd.templates import canonical_name

        self.state, self.cfg, self.rt = state, cfg, rt
        self.dev = rt.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.datasets = [canonical_name(x) for x in str(cfg["datasets"]).split(",") if x.strip()]
        ans = str(cfg["answer_datasets"]).strip().lower()
        self.answer_datasets = (list(self.datasets) if ans == "all" else [] if ans in ("none", "") else
                                [canonical_name(x) for x in str(cfg["answer_datasets"]).split(",") if x.strip()])
        split = lambda key: tuple(m.strip() for m in str(cfg[key]).split(",") if m.strip())
        self.measures, self.curve_measures = split("measures"), split("curve_measures")
        self.ablation_measures = split("ablation_measures")
        self.zoo_dir = state / "zoo"
        self._ev = None
        self._items: dict = {}
        self._subsets: dict = {}
        self._encoder = None
        self._gen_encoder = None
        self._grid_cache: dict = {}
        self.stages_run: list[str] = []
        if self.dev.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

    # ------------------------------------------------------------------ stages and their state
    def stages(self) -> list[tuple[str, str, str | None]]:
        out = [("base", "base", None)]
        out += [(f"zoo:{short(d)}", "zoo", d) for d in self.datasets]
        out += [(f"gen:{short(d)}", "gen", d) for d in self.datasets]
        out += [(f"ans:{short(d)}", "ans", d) for d in self.answer_datasets]
        return out

    def stage_file(self, name: str) -> Path:
        return self.state / "stages" / f"{name.replace(':', '__')}.json"

    def done(self, name: str) -> bool:
        return self.stage_file(name).exists()

    def load_stage(self, name: str) -> dict | None:
        p = self.stage_file(name)
        return json.loads(p.read_text()) if p.exists() else None

    def estimate(self, kind: str) -> tuple[float, str]:
        priors = dict(PRIORS)
        priors.update(self.rt.get("priors") or {})
        meas = [s["stage_seconds"] for n, k, _ in self.stages() if k == kind and (s := self.load_stage(n))]
        if not meas and kind == "ans":
            meas = [s["stage_seconds"] for n, k, _ in self.stages() if k == "gen" and (s := self.load_stage(n))]
        if meas:
            return max(meas), "measured"
        return float(priors[kind]), "prior"

    # ------------------------------------------------------------------ data
    @property
    def ev(self) -> Evaluator:
        if self._ev is None:
            self._ev = Evaluator(self.cfg["model"], self.dev, int(self.rt.get("eval_batch") or 128), self.measures,
                                 int(self.cfg["max_new_tokens"]))
        return self._ev

    def subset(self, d: str) -> dict:
        """The fixed evaluation subset of d's DnD test part and the held-out condition pool."""
        if d in self._subsets:
            return self._subsets[d]
        from softprompt.dnd.harness import dnd_records

        recs = dnd_records(d, "test")
        order = sha_rank(f"{d}|dnd-bench-eval", len(recs))
        n = min(int(self.cfg["eval_n"]), len(recs))
        ev_idx, rest = sorted(order[:n]), order[n:]
        if len(rest) >= int(self.cfg["min_pool"]):
            pool = [recs[i] for i in rest[: int(self.cfg["heldout_pool"])]]
            source = "test part, disjoint from the evaluated examples"
        else:
            zoo = dnd_records(d, "zoo")
            pool = [zoo[i] for i in sha_rank(f"{d}|dnd-bench-pool", len(zoo))[: int(self.cfg["heldout_pool"])]]
            source = f"zoo part (train split): only {len(rest)} test examples are not evaluated"
        info = {"n_test": len(recs), "n_eval": n, "eval_sha256": hashlib.sha256(json.dumps(ev_idx).encode()).hexdigest(),
                "prompt_source": source, "n_pool": len(pool)}
        self._subsets[d] = {"eval": [recs[i] for i in ev_idx], "pool": pool, "info": info}
        return self._subsets[d]

    def items(self, d: str):
        if d not in self._items:
            from softprompt.dnd.templates import format_dataset

            self._items[d] = format_dataset(d, self.subset(d)["eval"], self.ev.tok)
        return self._items[d]

    def train_prompts(self, d: str, with_answer: bool) -> list[str]:
        from softprompt.dnd.harness import dnd_records

        recs = dnd_records(d, "zoo")
        keep = sha_rank(f"{d}|dnd-bench-pool", len(recs))[: int(self.cfg["train_pool"])]
        return [condition_text(d, recs[i], with_answer) for i in keep]

    def heldout_prompts(self, d: str, with_answer: bool) -> list[str]:
        return [condition_text(d, r, with_answer) for r in self.subset(d)["pool"]]

    @property
    def scale(self) -> float:
        return float(2 * int(self.cfg["rank"])) / int(self.cfg["rank"])  # lora_alpha = 2r (build_zoo default)

    # ------------------------------------------------------------------ stage: base
    def stage_base(self) -> dict:
        return {"scores": {d: self.ev.score(self.items(d)) for d in self.datasets},
                "subsets": {d: self.subset(d)["info"] for d in self.datasets}}

    # ------------------------------------------------------------------ stage: zoo
    def part_dir(self, d: str) -> Path:
        from softprompt.dnd.zoo import dataset_dirname

        return self.zoo_dir / "parts" / dataset_dirname(d)

    def stage_zoo(self, d: str) -> dict:
        import torch
        from safetensors.torch import load_file

        from softprompt.dnd.export import read_lora_tensors
        from softprompt.dnd.harness import load_model
        from softprompt.dnd.tokenizer import (
            TokenLayout,
            canonicalize_state,
            to_grid,
            tokenize,
        )
        from softprompt.dnd.zoo import build_zoo

        cfg = self.cfg
        part = self.part_dir(d)
        shutil.rmtree(part, ignore_errors=True)
        part.parent.mkdir(parents=True, exist_ok=True)
        model, tok = load_model(cfg["model"], device=self.dev)
        curve_steps = sorted(int(s) for s in str(cfg["curve_steps"]).split(",") if s.strip())
        t0 = time.perf_counter()
        m = build_zoo(cfg["model"], [d], rank=int(cfg["rank"]), targets=cfg["targets"],
                      warmup_steps=int(cfg["warmup_steps"]), checkpoints=int(cfg["checkpoints"]), out=part,
                      lr=float(cfg["zoo_lr"]), batch_size=int(cfg["zoo_batch"]), max_length=int(cfg["max_length"]),
                      init_seed=int(cfg["init_seed"]), data_seed=int(cfg["data_seed"]) + self.datasets.index(d),
                      train_limit=int(cfg["train_limit"]) or None, dev_limit=0, device=self.dev, model=model,
                      tokenizer=tok, progress=False, curve_steps=[s for s in curve_steps if s <= int(cfg["warmup_steps"])],
                      format="letter", schedule="constant")  # this (issue 7) pipeline scores the letter format
        zoo_seconds = time.perf_counter() - t0
        del model
        if self.dev.startswith("cuda"):
            torch.cuda.empty_cache()
        # every dataset must start from the same LoRA (one gauge for the generator's A/B targets)
        ref = self.zoo_dir / "init_reference.safetensors"
        init = part / "init" / "adapter_model.safetensors"
        if ref.exists():
            a, b = load_file(str(ref)), load_file(str(init))
            if set(a) != set(b) or any(not torch.equal(a[k], b[k]) for k in a):
                raise RuntimeError(f"{d}: LoRA init differs from the first zoo dataset's (no shared gauge)")
        else:
            shutil.copy(init, ref)
        entry = m["datasets"][d]
        # tokenise the kept checkpoints once (generators reuse the grids)
        t1 = time.perf_counter()
        grids, layout = {}, None
        for rec in m["checkpoints"]:
            st = canonicalize_state(read_lora_tensors(part / rec["path"]), cfg["target"])
            layout = layout or TokenLayout.from_state_dict(st, int(cfg["chunk"]), cfg["stats_code"])
            grids[rec["path"]] = to_grid(tokenize(st, layout), cfg["stats_code"])
        torch.save(grids, part / "grids.pt")
        tokenize_seconds = time.perf_counter() - t1
        # scores: the final checkpoint on every dataset; the training curve on d
        t2 = time.perf_counter()
        final = m["checkpoints"][-1]
        final_state = read_lora_tensors(part / final["path"])
        final_on = {d2: self.ev.score(self.items(d2), final_state, self.scale) for d2 in self.datasets}
        by_step = {c["step"]: (c["path"], c["train_seconds"]) for c in entry["curve"]}
        by_step.update({c["step"]: (c["path"], c["train_seconds"]) for c in m["checkpoints"]})
        curve = []
        for s in sorted(set(curve_steps) | {final["step"]}):
            if s not in by_step:
                continue
            path, secs = by_step[s]
            sc = final_on[d] if s == final["step"] else self.ev.score(self.items(d), read_lora_tensors(part / path),
                                                                      self.scale, self.curve_measures)
            curve.append({"step": s, "train_seconds": secs, **sc})
        return {"dataset": d, "zoo_seconds": round(zoo_seconds, 3), "train_seconds": entry["train_seconds"],
                "steps": int(cfg["warmup_steps"]) + int(cfg["checkpoints"]), "n_checkpoints": len(m["checkpoints"]),
                "n_zoo_examples": entry["n_zoo"], "splits": entry["splits"], "final_step": final["step"],
                "final_path": str(Path("parts") / part.name / final["path"]), "final_on": final_on, "curve": curve,
                "tokenize_seconds": round(tokenize_seconds, 3), "eval_seconds": round(time.perf_counter() - t2, 3),
                "lora_parameters": layout.n_params, "tokens": list(layout.grid_shape)}

    def write_zoo_manifest(self) -> None:
        """``zoo/manifest.json`` over every completed zoo part (paths relative to ``zoo/``)."""
        cks = []
        for d in self.datasets:
            if not self.done(f"zoo:{short(d)}"):
                continue
            part = self.part_dir(d)
            m = json.loads((part / "manifest.json").read_text())
            cks += [{**c, "path": str(Path("parts") / part.name / c["path"])} for c in m["checkpoints"]]
        self.zoo_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.zoo_dir / "manifest.json", {"checkpoints": cks})

    # ------------------------------------------------------------------ stage: generator
    def encoder(self):
        if self._encoder is None:
            from softprompt.dnd.condition import ConditionEncoder

            self._encoder = ConditionEncoder(self.cfg["encoder"], max_length=int(self.cfg["cond_length"]),
                                             device=self.dev, cache_device=self.dev)
            # generation is timed with a cache-free encoder: every adapter pays for encoding its prompts
            self._gen_encoder = ConditionEncoder(self.cfg["encoder"], max_length=int(self.cfg["cond_length"]),
                                                 device=self.dev, cache=False)
        return self._encoder

    def fill_grid_cache(self, entries: list[dict]) -> None:
        import torch

        key = (int(self.cfg["chunk"]), self.cfg["target"], self.cfg["stats_code"])
        for d in dict.fromkeys(e["dataset"] for e in entries):
            part = self.part_dir(d)
            if any(str(part) in p for p, *_ in self._grid_cache):
                continue
            for rel, g in torch.load(part / "grids.pt").items():
                self._grid_cache[(str(part / rel), *key)] = g

    def generate(self, dec, layout, pool: list[str], n: int, seed: int) -> tuple[dict, float]:
        """n distinct prompts (seeded draw) -> LoRA state dict, seconds (prompt encoding + decoder + detokenise).

        The decoder takes N prompts: n < N fills the N slots cyclically; n > N splits them into ceil(n/N) groups of N
        (the last filled cyclically), decodes each and averages the token grids. n == N equals ``generate``."""
        import torch

        from softprompt.dnd.tokenizer import detokenize, from_grid

        big_n = dec.chain[0][0]
        devt = next(dec.parameters()).device
        sync = torch.cuda.synchronize if devt.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        rng = random.Random(seed)
        chosen = rng.sample(pool, n) if len(pool) >= n else [rng.choice(pool) for _ in range(n)]
        groups = math.ceil(n / big_n)
        slots = [chosen[i % n] for i in range(groups * big_n)]
        cond, _ = self._gen_encoder.encode_batch([slots[g * big_n:(g + 1) * big_n] for g in range(groups)])
        with torch.no_grad(), torch.autocast(devt.type, dtype=torch.bfloat16, enabled=devt.type == "cuda"):
            grid = dec(cond.to(devt)).float().mean(0)
        state = detokenize(from_grid(grid, layout), layout, dtype=torch.float32)
        sync()
        return state, time.perf_counter() - t0

    def stage_gen(self, h: str, with_answer: bool) -> dict:
        import torch
        from safetensors.torch import load_file

        from softprompt.dnd.export import (
            delta_distance,
            delta_norms,
            read_lora_tensors,
            read_zoo,
            write_adapter,
        )
        from softprompt.dnd.generator import (
            HyperConvDecoder,
            load_generator_config,
            train_generator,
        )
        from softprompt.dnd.tokenizer import TokenLayout

        cfg = self.cfg
        out = self.state / "gen" / f"{'ans' if with_answer else 'gen'}-{short(h)}"
        shutil.rmtree(out, ignore_errors=True)
        self.write_zoo_manifest()  # (a run killed between a zoo stage and its manifest update leaves it stale)
        entries = [e for e in read_zoo(self.zoo_dir) if e["dataset"] != h]
        self.fill_grid_cache(entries)
        enc = self.encoder()
        summ = train_generator(
            self.zoo_dir, h, out, int(cfg["gen_steps"]), prompts_for=lambda d: self.train_prompts(d, with_answer),
            encoder=enc, max_length=int(cfg["cond_length"]), n_prompts=int(cfg["n_prompts"]),
            batch_size=int(cfg["gen_batch"]), lr=float(cfg["gen_lr"]), weight_decay=float(cfg["gen_weight_decay"]),
            warmup=int(cfg["gen_warmup"]), width=int(cfg["width"]), n_layers=int(cfg["n_layers"]),
            kernel=int(cfg["kernel"]), chunk=int(cfg["chunk"]), target=cfg["target"],
            stats_code=cfg["stats_code"], seed=int(cfg["gen_seed"]),
            device=self.dev, log_every=0, verbose=False, grid_cache=self._grid_cache)
        gcfg = load_generator_config(out)
        dec = HyperConvDecoder([tuple(s) for s in gcfg["chain"]], gcfg["kernel"])
        dec.load_state_dict(load_file(str(out / "generator.safetensors")))
        dec.to(self.dev).eval()
        layout = TokenLayout.from_json(gcfg["layout"])
        pool = self.heldout_prompts(h, with_answer)
        items = self.items(h)
        big_n = int(cfg["n_prompts"])
        self.generate(dec, layout, pool, big_n, seed=10_000)  # warm-up (kernel selection), not timed
        samples, first = [], None
        for s in range(int(cfg["samples"])):
            st, secs = self.generate(dec, layout, pool, big_n, seed=s)
            samples.append({"seed": s, "seconds": round(secs, 4), **self.ev.score(items, st, self.scale)})
            if first is None:
                first = st
                write_adapter(st, out / "template_adapter_config.json", out / "adapter_seed0", base_model=cfg["model"])
        losses = summ["losses"]
        k = max(1, len(losses) // 20)
        res = {"heldout": h, "conditions": "prompt+answer" if with_answer else "prompt",
               "train_seconds": round(summ["seconds"], 3), "parameters": summ["parameters"],
               "chain": gcfg["chain"], "train_datasets": gcfg["train_datasets"], "n_train_checkpoints": len(entries),
               "loss_first": statistics.fmean(losses[:k]), "loss_last": statistics.fmean(losses[-k:]),
               "prompt_source": self.subset(h)["info"]["prompt_source"], "n_pool": len(pool), "samples": samples}
        if with_answer:
            return res
        # baseline: the elementwise mean of A and of B over all training checkpoints (the MSE optimum when the
        # condition carries no information; jerryliang24/Drag-and-Drop-LLMs#4)
        mean_state: dict = {}
        for e in entries:
            for key, v in read_lora_tensors(e["path"]).items():
                mean_state[key] = mean_state.get(key, 0) + v.double() / len(entries)
        mean_state = {key: v.float() for key, v in mean_state.items()}
        res["zoo_mean"] = self.ev.score(items, mean_state, self.scale)
        counts = []
        for n in (int(x) for x in str(cfg["prompt_counts"]).split(",") if x.strip()):
            for s in range(int(cfg["ablation_samples"])):
                st, secs = self.generate(dec, layout, pool, n, seed=s)
                counts.append({"n_prompts": n, "seed": s, "seconds": round(secs, 4),
                               **self.ev.score(items, st, self.scale, self.ablation_measures)})
        res["prompt_counts"] = counts
        # where the generated adapter lies: ||dW|| distances to every dataset's final LoRA and to the zoo mean
        finals = {}
        for d in self.datasets:
            z = self.load_stage(f"zoo:{short(d)}")
            finals[d] = read_lora_tensors(self.zoo_dir / z["final_path"])
        norm = lambda st: math.sqrt(sum(v * v for v in delta_norms(st).values()))
        res["sanity"] = {
            "finite": all(bool(torch.isfinite(v).all()) for v in first.values()),
            "norm": norm(first), "zoo_mean_norm": norm(mean_state),
            "final_norms": {d: norm(st) for d, st in finals.items()},
            "distance_to_final": {d: delta_distance(first, st) for d, st in finals.items()},
            "distance_to_zoo_mean": delta_distance(first, mean_state),
        }
        return res

    # ------------------------------------------------------------------ driver loop
    def run_stage(self, name: str, kind: str, d: str | None) -> dict:
        if kind == "base":
            return self.stage_base()
        if kind == "zoo":
            return self.stage_zoo(d)
        missing = [n for n, k, _ in self.stages() if k in ("base", "zoo") and not self.done(n)]
        if missing:
            raise RuntimeError(f"{name} needs {missing} first")
        return self.stage_gen(d, with_answer=kind == "ans")

    def run(self, budget: float | None, export: Path | None, record: dict) -> str:
        safety, reserve = float(self.rt.get("safety") or 1.15), float(self.rt.get("reserve") or 0)
        status = "complete"
        for name, kind, d in self.stages():
            if self.done(name):
                continue
            est, how = self.estimate(kind)
            elapsed = time.time() - T_START
            if budget is not None and elapsed + est * safety + reserve > budget:
                status = (f"stopped before {name}: estimated {est:.0f} s ({how}) x {safety} + {reserve:.0f} s reserve "
                          f"> {budget - elapsed:.0f} s left of {budget:.0f} s")
                break
            log(f"stage {name} (estimated {est:.0f} s, {how})", self.state)
            t0 = time.time()
            res = self.run_stage(name, kind, d)
            res["stage_seconds"] = round(time.time() - t0, 3)
            res["process_stage_index"] = len(self.stages_run)  # 0 = first stage of a process (cold caches)
            write_json(self.stage_file(name), res)
            if kind == "zoo":
                self.write_zoo_manifest()
            self.stages_run.append(name)
            record["stages_run"] = list(self.stages_run)
            log(f"stage {name} done in {res['stage_seconds']:.1f} s", self.state)
            if export is not None:
                export_results(self.state, export, record=record)
        return status


# ---------------------------------------------------------------------------------------------- results + report
def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def collect(state: Path, record: dict | None = None) -> dict:
    """All stage results of ``state`` plus derived numbers (means, claims, costs) in one JSON-able dict."""
    cfg = json.loads((state / "config.json").read_text())
    invocations = json.loads((state / "invocations.json").read_text()) if (state / "invocations.json").exists() else []
    if record is not None:
        invocations = [i for i in invocations if i.get("id") != record.get("id")] + [record]
    stages_dir = state / "stages"
    stages = {p.stem.replace("__", ":"): json.loads(p.read_text()) for p in sorted(stages_dir.glob("*.json"))}
    from softprompt.dnd.templates import canonical_name

    datasets = [canonical_name(x) for x in str(cfg["datasets"]).split(",") if x.strip()]
    ans = str(cfg["answer_datasets"]).strip().lower()
    ans_ds = (datasets if ans == "all" else [] if ans in ("none", "") else
              [canonical_name(x) for x in str(cfg["answer_datasets"]).split(",") if x.strip()])
    names = ["base"] + [f"{k}:{short(d)}" for k in ("zoo", "gen") for d in datasets] + [f"ans:{short(d)}" for d in ans_ds]
    measures = [m for m in ("loglik", "gen") if m in str(cfg["measures"])]
    base = stages.get("base", {}).get("scores", {})
    zoo = {d: stages.get(f"zoo:{short(d)}") for d in datasets}
    rows = {}
    for h in datasets:
        g = stages.get(f"gen:{short(h)}")
        a = stages.get(f"ans:{short(h)}")
        row = {"dataset": h, "n": (base.get(h) or {}).get("n"),
               "prompt_source": (stages.get("base", {}).get("subsets", {}).get(h) or {}).get("prompt_source")}
        for m in measures:
            key = f"{m}_acc"
            others = {d: zoo[d]["final_on"][h][key] for d in datasets if d != h and zoo[d]}
            r = {"base": (base.get(h) or {}).get(key),
                 "train_mean": _mean(others.values()) if len(others) == len(datasets) - 1 else None,
                 "train_best": max(others.values()) if len(others) == len(datasets) - 1 else None,
                 "train_best_dataset": max(others, key=others.get) if len(others) == len(datasets) - 1 else None,
                 "own": zoo[h]["final_on"][h][key] if zoo[h] else None}
            if g:
                accs = [s[key] for s in g["samples"]]
                r.update({"dnd_mean": _mean(accs), "dnd_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                          "dnd_best": max(accs), "dnd_k": len(accs), "zoo_mean": g["zoo_mean"][key]})
                r["counts"] = {}
                for c in g["prompt_counts"]:
                    if key in c:
                        r["counts"].setdefault(str(c["n_prompts"]), []).append(c[key])
                r["counts"] = {n: _mean(v) for n, v in r["counts"].items()}
                if r["counts"]:
                    r["counts"][str(cfg["n_prompts"])] = r["dnd_mean"]
                if r["train_mean"] is not None and r["base"] is not None:
                    r["beats_train_mean"] = r["dnd_mean"] > r["train_mean"]
                    r["beats_base"] = r["dnd_mean"] > r["base"]
                    r["beats_train_best"] = r["dnd_mean"] > r["train_best"]
                # cost: optimiser seconds of the held-out dataset's own LoRA until its curve reaches DnD's accuracy
                if zoo[h] and r["base"] is not None and all(key in c for c in zoo[h]["curve"]):
                    curve = [(0.0, 0, r["base"])] + [(c["train_seconds"], c["step"], c[key]) for c in zoo[h]["curve"]]
                    hit = next(((t, s) for t, s, acc in curve if acc >= r["dnd_mean"]), None)
                    r["lora_seconds_to_match"] = hit[0] if hit else None
                    r["lora_steps_to_match"] = hit[1] if hit else None
                    r["lora_curve_max_seconds"] = curve[-1][0]
            if a:
                r["answers_mean"] = _mean([s[key] for s in a["samples"]])
            row[m] = r
        if g:
            row["gen_seconds"] = _mean([s["seconds"] for s in g["samples"]])
            row["generator_train_seconds"] = g["train_seconds"]
            row["generator_parameters"] = g["parameters"]
            row["loss_first"], row["loss_last"] = g["loss_first"], g["loss_last"]
            row["sanity"] = g["sanity"]
        if a:
            row["answer_generator_train_seconds"] = a["train_seconds"]
        rows[h] = row
    done = [n for n in names if n in stages]
    inv_env = next((i["env"] for i in reversed(invocations) if i.get("env")), {})
    return {
        "title": "Drag-and-Drop on SmolLM2-135M-Instruct: leave-one-dataset-out",
        "config": cfg, "env": inv_env, "invocations": invocations,
        "status": {"done": done, "pending": [n for n in names if n not in stages]},
        "stage_seconds": {n: stages[n]["stage_seconds"] for n in done},
        "subsets": stages.get("base", {}).get("subsets", {}),
        "zoo_cost": {"seconds": sum(z["zoo_seconds"] for z in zoo.values() if z),
                     "train_seconds": sum(z["train_seconds"] for z in zoo.values() if z),
                     "datasets": sum(1 for z in zoo.values() if z)},
        "rows": rows, "stages": stages,
    }


def _claims(res: dict, m: str) -> list[str]:
    out = []
    for h, row in res["rows"].items():
        r = row.get(m, {})
        if r.get("dnd_mean") is None or r.get("train_mean") is None:
            continue
        dm, tm, b = r["dnd_mean"], r["train_mean"], r["base"]
        verb = lambda x, y: "beats" if x > y else "ties with" if x == y else "does not beat"
        out.append(f"- {short(h)}: DnD {_pct(dm)} {verb(dm, tm)} the training-LoRA mean "
                   f"{_pct(tm)} ({100 * (dm - tm):+.1f}) and {verb(dm, b)} the base model "
                   f"{_pct(b)} ({100 * (dm - b):+.1f}); best training LoRA {_pct(r['train_best'])} "
                   f"({short(r['train_best_dataset'])}), own LoRA {_pct(r['own'])}.")
    n = [r[m] for r in res["rows"].values() if r.get(m, {}).get("beats_train_mean") is not None]
    if n:
        out.append(f"- **Summary:** DnD beats the training-LoRA mean on {sum(r['beats_train_mean'] for r in n)}/{len(n)}"
                   f", the base model on {sum(r['beats_base'] for r in n)}/{len(n)} and the best training LoRA on "
                   f"{sum(r['beats_train_best'] for r in n)}/{len(n)} held-out datasets.")
    return out


def render(res: dict) -> str:
    cfg, env = res["config"], res.get("env", {})
    mname = {"loglik": "option log-likelihood accuracy", "gen": "greedy generation, parsed answer"}
    L = [f"# {res['title']}", ""]
    invs = res.get("invocations", [])
    dates = sorted({i["start"][:10] for i in invs if i.get("start")})
    L += [(f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
          f"peft {env.get('peft', '?')}, Python {env.get('python', '?')}. Date: {', '.join(dates) or '?'}. "
          f"Generated by `benchmarks/dnd_bench.py` (procedure: `docs/dnd_gpu.md`)."), ""]
    st = res["status"]
    if st["pending"]:
        L += [(f"**Incomplete:** {len(st['done'])} of {len(st['done']) + len(st['pending'])} stages done; not run yet: "
              f"{', '.join(st['pending'])}."), ""]
    L += ["## Setup", "",
          (f"- Base model `{cfg['model']}`; zoo: one LoRA per dataset (r={cfg['rank']}, alpha={2 * int(cfg['rank'])}, "
          f"targets {cfg['targets']}), all from one init (seed {cfg['init_seed']}, asserted), "
          f"{cfg['warmup_steps']} warm-up + {cfg['checkpoints']} kept steps, batch {cfg['zoo_batch']}, lr {cfg['zoo_lr']}; "
          f"answer-only LM loss."),
          (f"- Generator: hyper-convolutional decoder (kernel {cfg['kernel']}, width {cfg['width']}, {cfg['n_layers']} "
          f"layers, chunk {cfg['chunk']}, target `{cfg['target']}`, token stats code `{cfg.get('stats_code', 'dnd')}`), "
          f"{cfg['gen_steps']} steps x batch {cfg['gen_batch']}, "
          f"lr {cfg['gen_lr']}; conditions: {cfg['n_prompts']} prompts x {cfg['cond_length']} tokens from encoder "
          f"`{cfg['encoder']}`, resampled every step from up to {cfg['train_pool']} prompts per training dataset."),
          (f"- Leave-one-dataset-out: the generator for held-out h is trained on the other datasets' checkpoints only; "
          f"h's adapter is generated from h's unlabeled prompts ({cfg['samples']} draws of {cfg['n_prompts']}, seeds "
          f"0..{int(cfg['samples']) - 1}). *Train LoRAs*: the other datasets' final checkpoints evaluated on h "
          f"(mean, best); *zoo mean*: elementwise mean of A and B over the generator's training checkpoints; "
          f"*own LoRA*: h's own zoo LoRA (upper bound). *DnD best* picks the best draw with test labels (optimistic)."),
          (f"- Evaluation: a fixed sha256-ranked subset of each dataset's DnD test part (up to {cfg['eval_n']}); "
          f"{', '.join(mname[m] for m in ('loglik', 'gen') if m in cfg['measures'])} (max {cfg['max_new_tokens']} new "
          f"tokens; unparseable = wrong)."), ""]
    subs = res.get("subsets", {})
    if subs:
        L += ["| dataset | test part | evaluated | condition prompts from | pool |", "|---|---|---|---|---|"]
        for d, s in subs.items():
            L.append(f"| {short(d)} | {s['n_test']} | {s['n_eval']} | {s['prompt_source']} | {s['n_pool']} |")
        L.append("")
    for m in ("loglik", "gen"):
        if m not in cfg["measures"]:
            continue
        L += [f"## Held-out accuracy, {mname[m]} (%)", "",
              "| held-out | n | base | train LoRAs mean | train LoRAs best | zoo mean (A,B) | DnD mean ± sd | DnD best | own LoRA |",
              "|---|---|---|---|---|---|---|---|---|"]
        cols = {k: [] for k in ("base", "train_mean", "train_best", "zoo_mean", "dnd_mean", "dnd_best", "own")}
        for h, row in res["rows"].items():
            r = row.get(m, {})
            for k, col in cols.items():
                col.append(r.get(k))
            dnd = "–" if r.get("dnd_mean") is None else f"{_pct(r['dnd_mean'])} ± {100 * r['dnd_sd']:.1f} (k={r['dnd_k']})"
            best = "–" if r.get("train_best") is None else f"{_pct(r['train_best'])} ({short(r['train_best_dataset'])})"
            L.append(f"| {short(h)} | {row.get('n') or '–'} | {_pct(r.get('base'))} | {_pct(r.get('train_mean'))} | {best} | "
                     f"{_pct(r.get('zoo_mean'))} | {dnd} | {_pct(r.get('dnd_best'))} | {_pct(r.get('own'))} |")
        if all(all(v is not None for v in c) for c in cols.values()) and res["rows"]:
            L.append("| **mean** | | " + " | ".join(
                _pct(_mean(cols[k])) for k in ("base", "train_mean", "train_best", "zoo_mean", "dnd_mean", "dnd_best", "own")
            ) + " |")
        if m == "gen":
            inv = [f"{short(h)} {_pct(res['stages']['base']['scores'][h].get('gen_invalid'))}"
                   for h in res["rows"] if "base" in res["stages"] and h in res["stages"]["base"]["scores"]]
            if inv:
                L += ["", f"Unparseable answers of the base model (%): {', '.join(inv)}."]
        L += ["", f"### Where DnD does and does not win ({mname[m]}; computed from the table)", ""]
        L += _claims(res, m) or ["- (no held-out dataset complete yet)"]
        L.append("")
    # cost
    zc = res["zoo_cost"]
    L += ["## Cost", "",
          ("Seconds on this device. *Generate*: encoding the prompts + one decoder pass + detokenising (mean over draws; "
          "the generator is loaded). *LoRA to match*: optimiser seconds of the held-out dataset's own LoRA (batch "
          f"{cfg['zoo_batch']}, scored at steps {cfg['curve_steps']} and the last) until it first reaches DnD's mean "
          "accuracy (0 = the base model already does; '>' = never within the run)."), "",
          ("| held-out | generate (s) | generator training (s) | LoRA to match, log-lik (s, step) | speed-up | "
          "LoRA to match, generation (s, step) | speed-up |"), "|---|---|---|---|---|---|---|"]
    for h, row in res["rows"].items():
        if row.get("gen_seconds") is None:
            continue
        cells = []
        for m in ("loglik", "gen"):
            r = row.get(m, {})
            if "lora_seconds_to_match" not in r:
                cells += ["–", "–"]
            elif r["lora_seconds_to_match"] is None:
                cells += [f"> {r['lora_curve_max_seconds']:.2f}", f"> {r['lora_curve_max_seconds'] / row['gen_seconds']:.0f}x"]
            else:
                t = r["lora_seconds_to_match"]
                cells += [f"{t:.2f} (step {r['lora_steps_to_match']})",
                          f"{t / row['gen_seconds']:.0f}x" if t else "base already matches"]
        L.append(f"| {short(h)} | {row['gen_seconds']:.3f} | {row['generator_train_seconds']:.1f} | " + " | ".join(cells) + " |")
    L += ["", (f"One-off costs: the zoo ({zc['datasets']} datasets x {int(cfg['warmup_steps']) + int(cfg['checkpoints'])} "
          f"steps, {cfg['checkpoints']} checkpoints each) took {zc['seconds']:.1f} s ({zc['train_seconds']:.1f} s of "
          f"optimiser steps; the rest is data preparation and saving checkpoints); each generator's training time is "
          "in the table above (tokenising the zoo is done once, in the zoo stages)."), ""]
    curves = {h: z["curve"] for h in res["rows"] if (z := res["stages"].get(f"zoo:{short(h)}"))}
    if curves:
        steps = sorted({c["step"] for cv in curves.values() for c in cv})
        L += [("Training curves of the held-out datasets' own LoRAs (log-lik accuracy %, cumulative optimiser seconds "
              "in brackets; step 0 = base model):"), "",
              "| dataset | 0 | " + " | ".join(str(x) for x in steps) + " |", "|---" * (len(steps) + 2) + "|"]
        for h, cv in curves.items():
            at = {c["step"]: c for c in cv}
            base_acc = res["rows"][h].get("loglik", {}).get("base")
            L.append(f"| {short(h)} | {_pct(base_acc)} | " + " | ".join(
                f"{_pct(at[x].get('loglik_acc'))} ({at[x]['train_seconds']:.2f})" if x in at else "–" for x in steps) + " |")
        L.append("")
    # ablations
    counts = sorted({int(n) for row in res["rows"].values() for n in row.get("loglik", row.get("gen", {})).get("counts", {})})
    if counts:
        for m in ("loglik", "gen"):
            if m not in cfg["measures"]:
                continue
            L += [f"## Ablation: number of condition prompts at generation ({mname[m]}, %)", "",
                  (f"The decoder takes N={cfg['n_prompts']} prompts: fewer distinct prompts fill the N slots cyclically; "
                  f"more are split into groups of N whose decoded grids are averaged. Mean over "
                  f"{cfg['ablation_samples']} draws (N itself: over {cfg['samples']})."), "",
                  "| held-out | " + " | ".join(str(c) for c in counts) + " |", "|---" * (len(counts) + 1) + "|"]
            for h, row in res["rows"].items():
                c = row.get(m, {}).get("counts")
                if c:
                    L.append(f"| {short(h)} | " + " | ".join(_pct(c.get(str(n))) for n in counts) + " |")
            L.append("")
    ans_rows = [(h, row) for h, row in res["rows"].items()
                if any(row.get(m, {}).get("answers_mean") is not None for m in ("loglik", "gen"))]
    if ans_rows:
        L += ["## Ablation: prompts vs prompts with answers (%)", "",
              (f"Done for {len(ans_rows)} of {len(res['rows'])} held-out datasets ({', '.join(short(h) for h, _ in ans_rows)}): "
              "generators trained with condition = prompt + '\\nAnswer: <gold option>' and fed the held-out "
              "dataset's labeled prompts the same way."), "",
              "| held-out | prompts, log-lik | prompts+answers, log-lik | prompts, generation | prompts+answers, generation |",
              "|---|---|---|---|---|"]
        for h, row in ans_rows:
            lg, gg = row.get("loglik", {}), row.get("gen", {})
            L.append(f"| {short(h)} | {_pct(lg.get('dnd_mean'))} | {_pct(lg.get('answers_mean'))} | "
                     f"{_pct(gg.get('dnd_mean'))} | {_pct(gg.get('answers_mean'))} |")
        L.append("")
    san = [(h, row) for h, row in res["rows"].items() if row.get("sanity")]
    if san:
        L += ["## Generated adapters vs the zoo (draw 0)", "",
              ("||ΔW|| = sqrt(sum over modules of ||B·A||²_F) (alpha/r omitted); distances in the same norm. "
              "Generator loss: weighted MSE on the token grid, mean of the first and last 5% of steps."), "",
              ("| held-out | ‖ΔW‖ | zoo mean ‖ΔW‖ | nearest final LoRA (distance) | distance to own LoRA | "
              "distance to zoo mean | generator loss first → last |"), "|---|---|---|---|---|---|---|"]
        for h, row in san:
            s = row["sanity"]
            dist = s["distance_to_final"]
            near = min((d for d in dist if d != h), key=dist.get)
            L.append(f"| {short(h)} | {s['norm']:.3g} | {s['zoo_mean_norm']:.3g} | {short(near)} ({dist[near]:.3g}) | "
                     f"{dist[h]:.3g} | {s['distance_to_zoo_mean']:.3g} | {row['loss_first']:.4f} → {row['loss_last']:.4f} |")
        L.append("")
    L += ["## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {n} | {s:.1f} |" for n, s in res["stage_seconds"].items()]
    L += ["", "## Commands", ""]
    for i in invs:
        L.append(f"- {i.get('start', '?')}: `{i.get('command', '?')}` -> {i.get('status', '?')} "
                 f"(stages: {', '.join(i.get('stages_run', [])) or 'none'})")
    return "\n".join(L) + "\n"


def export_results(state: Path, out: Path, record: dict | None = None) -> dict:
    """``out/dnd_results.json``, ``out/dnd.md`` and ``out/dnd_logs.tar.gz`` (stage JSONs, log, configs, zoo manifest,
    generator configs and loss logs; no weights)."""
    out.mkdir(parents=True, exist_ok=True)
    res = portable(collect(state, record))  # no machine's folders in what is committed
    write_json(out / "dnd_results.json", res)
    (out / "dnd.md").write_text(render(res))
    with tarfile.open(out / "dnd_logs.tar.gz", "w:gz") as tar:
        for p in [state / "config.json", state / "invocations.json", state / "log.txt", state / "zoo" / "manifest.json",
                  *sorted((state / "stages").glob("*.json")), *sorted((state / "gen").glob("*/generator_config.json")),
                  *sorted((state / "gen").glob("*/train_log.json"))]:
            if p.exists():
                tar.add(p, arcname=str(p.relative_to(state)))
    return res


# ------------------------------------------------------------------------------------------------------------ CLI
def parse_priors(s: str | None) -> dict:
    out = {}
    for kv in (s or "").split(","):
        if kv.strip():
            k, v = kv.split("=")
            out[k.strip()] = float(v)
    return out


def load_config(state: Path, args: argparse.Namespace) -> dict:
    """The state's frozen config; at the first run, DEFAULTS updated by the options given."""
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    path = state / "config.json"
    if path.exists():
        cfg = json.loads(path.read_text())
        diff = {k: (cfg.get(k), v) for k, v in given.items() if str(cfg.get(k)) != str(v)}
        if diff:
            raise SystemExit(f"{state} was started with another configuration: {diff} (state value, given). "
                             "Use a new --state, or leave these options out.")
        return cfg
    cfg = {**DEFAULTS, **given}
    if not cfg["model"]:
        raise SystemExit("--model is required at the first run of a state")
    for k in ("model", "encoder"):
        if cfg[k] and Path(cfg[k]).exists():
            cfg[k] = str(Path(cfg[k]).resolve())
    state.mkdir(parents=True, exist_ok=True)
    write_json(path, cfg)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    state = Path(args.state)
    cfg = load_config(state, args)
    (state / "stages").mkdir(parents=True, exist_ok=True)
    rt = {"device": args.device, "eval_batch": args.eval_batch, "priors": parse_priors(args.priors),
          "safety": args.safety, "reserve": args.reserve}
    inv_path = state / "invocations.json"
    invocations = json.loads(inv_path.read_text()) if inv_path.exists() else []
    for old in invocations:  # a run killed by the call's time limit never wrote its end
        if old.get("status") == "running":
            old["status"] = "killed before it finished (no end recorded)"
    record = {"id": len(invocations), "start": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": portable(shlex.join(["python", "benchmarks/dnd_bench.py", *args.argv])), "env": env_info(),
              "time_budget": args.time_budget, "stages_run": [], "status": "running"}
    write_json(inv_path, invocations + [record])
    bench = Bench(state, cfg, rt)
    log(f"run {record['id']}: {record['env']['device']}; pending "
        f"{[n for n, _, _ in bench.stages() if not bench.done(n)]}", state)
    export = Path(args.export) if args.export else None
    rc = 0
    try:
        status = bench.run(args.time_budget, export, record)
    except Exception as exc:  # noqa: BLE001  (keep what was done; report the failure)
        status = f"failed: {type(exc).__name__}: {exc}"
        log(traceback.format_exc(), state)
        rc = 1
    record.update({"status": status, "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "seconds": round(time.time() - T_START, 1)})
    write_json(inv_path, invocations + [record])
    if export is not None:
        res = export_results(state, export, record=record)
        log(f"exported to {export}: {len(res['status']['done'])} stages done, pending {res['status']['pending']}", state)
    log(f"STATUS: {status}", state)
    return rc


def cmd_plan(args: argparse.Namespace) -> int:
    state = Path(args.state)
    cfg = json.loads((state / "config.json").read_text()) if (state / "config.json").exists() else {**DEFAULTS}
    bench = Bench(state, cfg, {"priors": parse_priors(args.priors), "device": "cpu"})
    total = 0.0
    for name, kind, _ in bench.stages():
        s = bench.load_stage(name)
        if s:
            print(f"  done     {name:24s} {s['stage_seconds']:8.1f} s")
        else:
            est, how = bench.estimate(kind)
            total += est
            print(f"  pending  {name:24s} {est:8.1f} s ({how})  {KIND_TITLES[kind]}")
    print(f"pending total: {total:.0f} s")
    return 0


def cmd_cloze(args: argparse.Namespace) -> int:
    """Run the cloze study's pending stages (``softprompt.dnd.study``), exporting after every stage."""
    import torch

    from softprompt.dnd.study import Study

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    from softprompt.dnd.templates import DATASETS, canonical_name

    datasets = [canonical_name(d) for d in args.datasets.split(",")] if args.datasets else list(DATASETS)
    gen = {}
    for kv in filter(None, (args.gen or "").split(",")):
        k, _, v = kv.partition("=")
        gen[k.strip()] = v.strip() if k.strip() == "stats_code" else float(v) if "." in v or "e" in v else int(v)
    study = Study(state, args.model, datasets, configs=args.configs.split(";"), n_eval=args.n_eval,
                  n_dev=args.n_dev, batch_size=args.eval_batch, device=args.device, log=lambda m: log(m, state),
                  generators=args.generators, encoder=args.encoder, gen=gen, stats_ablation=args.stats_ablation,
                  gen_group=args.gen_group, gen_streams=args.gen_streams,
                  session_left=args.session_left - (time.time() - T_START) if args.session_left else None,
                  gen_step_seconds=args.gen_step_seconds, zoo_workers=args.zoo_workers)
    if args.restore:
        log(f"restored {study.restore(args.restore)}", state)
    info = {**env_info(), "command": portable(shlex.join(["python benchmarks/dnd_bench.py", *args.argv])),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with open(state / "invocations.jsonl", "a") as f:
        f.write(json.dumps(info) + "\n")
    status = "failed"
    try:
        status = study.run(args.time_budget - (time.time() - T_START) if args.time_budget else 1e9, args.export)
    finally:
        if args.export:
            study.export(args.export)
            shutil.copy(state / "invocations.jsonl", Path(args.export) / "dnd_cloze_invocations.jsonl")
        print(f"STATUS: {status}", flush=True)
    return 0


def cmd_gen_bench(args: argparse.Namespace) -> int:
    """Seconds per generator step, one generator or K side by side (``softprompt.dnd.gen_bench``); JSON to --out."""
    from softprompt.dnd.gen_bench import bench_steps

    kw = {k: int(v) for k, v in (kv.split("=") for kv in filter(None, (args.shape or "").split(",")))}
    runs = []
    for mode in args.cudnn.split(","):
        res = bench_steps(groups=[int(x) for x in args.groups.split(",")], steps=args.steps,
                          streams=not args.no_streams, cudnn_benchmark=mode == "on", device=args.device, **kw)
        runs.append(res)
    best = min(runs, key=lambda r: r["best"]["generator_step_seconds"])
    out = {**env_info(), "command": portable(shlex.join(["python benchmarks/dnd_bench.py", *args.argv])),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": runs}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "dnd_gen_bench.json").write_text(json.dumps(out, indent=1) + "\n")
    b = best["best"]
    print(f"BEST: K={b['group']} streams={b['streams']} cudnn_benchmark={best['cudnn_benchmark']}: "
          f"{b['generator_step_seconds']:.3f} s per generator-step (--gen-step-seconds), "
          f"{best['minutes_per_generator_1000_steps']:.1f} min per 1,000-step generator")
    return 0


def cmd_boolq_probe(args: argparse.Namespace) -> int:
    """BoolQ: base-model skill under each faithful cloze format, on zoo-part examples (softprompt.dnd.format_probe)."""
    import torch

    from softprompt.dnd.format_probe import probe_boolq, probe_records
    from softprompt.dnd.harness import load_model
    from softprompt.resources import resolve

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = load_model(str(resolve(args.model)), None, args.device)
    res = probe_boolq(model, tok, probe_records(args.n), args.batch_size, progress=print)
    res.update({**env_info(), "command": portable(shlex.join(["python benchmarks/dnd_bench.py", *args.argv])),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "examples": "sha256-ranked first n of the BoolQ DnD zoo part (key superglue/boolq|format-probe)"})
    print(f"n={res['n']}, gold yes-rate {res['yes_rate_gold']}%")
    for name, r in res["formats"].items():
        print(f"{name:26s} acc {r['acc']:5.1f}  acc_norm {r['acc_norm']:5.1f}  yes {r['yes_rate']:5.1f}%  balanced "
              f"{r['balanced_acc']:5.1f}  AUC {r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]  "
              f"calibrated: acc {r['acc_cal']:5.1f} yes {r['yes_rate_cal']:5.1f}% balanced {r['balanced_acc_cal']:5.1f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "dnd_boolq_probe.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


def cmd_cloze_report(args: argparse.Namespace) -> int:
    """dnd_cloze.json + dnd.md from exported stage results and the invocation record of the run."""
    from softprompt.dnd.report import build_results, render

    stages = json.loads(Path(args.stages).read_text())
    inv = [json.loads(x) for x in Path(args.invocations).read_text().splitlines() if x.strip()]
    last = inv[-1]
    versions = {k: last[k] for k in ("torch", "transformers", "peft", "python")}
    from softprompt.dnd.study import eval_records
    from softprompt.dnd.templates import DATASETS

    n = {d: r["test"]["n"] for d, r in stages.get("base", {}).get("datasets", {}).items()}
    golds = {d: [int(r["label"]) for r in eval_records(d, n[d])] for d in DATASETS if d in n}  # binary rows
    res = build_results(stages, args.config, args.measure, device=last["device"], versions=versions,
                        date=last["date"], command=last["command"], golds=golds)
    # every call of the state (a call that failed before finishing a stage is listed too)
    res["invocations"] = [{"date": i["date"], "command": i["command"], "device": i["device"]} for i in inv]
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    Path(args.md).write_text(render(res))
    print(f"wrote {args.json} and {args.md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("convert", help="GGUF -> HF folder (once)")
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("run", help="run the pending stages that fit in the time budget")
    p.add_argument("--state", required=True)
    p.add_argument("--time-budget", type=float, help="seconds from process start; stages that would not fit are left")
    p.add_argument("--export", help="folder for dnd_results.json / dnd.md / dnd_logs.tar.gz (after every stage)")
    p.add_argument("--device")
    p.add_argument("--eval-batch", type=int, default=128, help="evaluation batch (speed only)")
    p.add_argument("--priors", help="stage seconds before a stage of the kind was measured, e.g. zoo=60,gen=100")
    p.add_argument("--safety", type=float, default=1.15, help="factor on the estimates")
    p.add_argument("--reserve", type=float, default=15.0, help="seconds kept for exporting at the end")
    for k, v in DEFAULTS.items():
        typ = int if k in INT_KEYS else float if k in FLOAT_KEYS else str
        p.add_argument(f"--{k.replace('_', '-')}", dest=k, type=typ, default=None,
                       help=f"(config, default {v})")
    p = sub.add_parser("export", help="results JSON + markdown from a state")
    p.add_argument("--state", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("report", help="markdown from a results JSON")
    p.add_argument("--results", required=True)
    p.add_argument("--out", help="markdown file (default: print)")
    p = sub.add_parser("plan", help="stages, state and estimates")
    p.add_argument("--state", required=True)
    p.add_argument("--priors")
    p = sub.add_parser("cloze", help="issue 21: cloze base scores, zoo gate, cross-dataset LoRA scores")
    p.add_argument("--state", required=True)
    p.add_argument("--model", required=True, help="HF folder or alias of the base model")
    p.add_argument("--configs", default="r8,lr2e-4,steps250,ckpt50",
                   help="';'-separated zoo configs (softprompt.dnd.study.parse_config)")
    p.add_argument("--datasets", help="comma list (default: the seven)")
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--n-dev", type=int, default=500)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--time-budget", type=float)
    p.add_argument("--export")
    p.add_argument("--restore", help="dnd_cloze_stages.json of an earlier run (state lost)")
    p.add_argument("--generators", action="store_true", help="also the leave-one-out gen/dnd stages")
    p.add_argument("--encoder", default="minilm", help="condition encoder: alias or HF folder")
    p.add_argument("--stats-ablation", action="store_true",
                   help="also every generator with DnD's scale code (stages gen/dnd:<cfg>+statsdnd:<h>)")
    p.add_argument("--gen", help="generator overrides, e.g. steps=1000,batch_size=64,lr=1e-3,stats_code=dnd "
                                 "(softprompt.dnd.study_gen.GEN_DEFAULTS)")
    p.add_argument("--device")
    p.add_argument("--zoo-workers", type=int, default=1,
                   help="zoo stages of a config trained in this many processes at once on the one GPU")
    p.add_argument("--gen-group", type=int, default=1, help="generators trained side by side (one process)")
    p.add_argument("--gen-streams", action="store_true", help="one CUDA stream per generator of a group")
    p.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN autotuning for the generator convolutions")
    p.add_argument("--session-left", type=float,
                   help="device seconds left in the session at this call's start (run tool status: budget_left_s); "
                        "a generator that cannot finish, with its dnd stage, before then is not started")
    p.add_argument("--gen-step-seconds", type=float,
                   help="seconds per generator step until one is measured here (gen-bench's BEST line)")
    p = sub.add_parser("gen-bench", help="seconds per generator step, 1 or K generators side by side (no zoo)")
    p.add_argument("--groups", default="1,2", help="group sizes K to time")
    p.add_argument("--steps", type=int, default=5, help="timed rounds per K (after 2 warm-up rounds)")
    p.add_argument("--no-streams", action="store_true", help="skip the one-stream-per-generator variant")
    p.add_argument("--cudnn", default="off", help="cuDNN autotuning: off, on, or off,on (both timed)")
    p.add_argument("--shape", help="bench_steps overrides, e.g. batch_size=8,width=32 (default: the real sizes)")
    p.add_argument("--device")
    p.add_argument("--out", help="folder for dnd_gen_bench.json")
    p = sub.add_parser("boolq-probe", help="BoolQ base-model skill per faithful cloze format (zoo-part examples)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n", type=int, default=400, help="zoo-part examples (sha256-ranked)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="folder for dnd_boolq_probe.json")
    p = sub.add_parser("cloze-report", help="dnd_cloze.json + dnd.md from exported cloze stages")
    p.add_argument("--stages", required=True)
    p.add_argument("--invocations", required=True)
    p.add_argument("--config", required=True, help="zoo config name, e.g. r8_lr2e-4_steps250_ckpt50")
    p.add_argument("--measure", default="primary", choices=("primary", "acc", "acc_norm"),
                   help="primary: acc_norm, acc for BoolQ and WinoGrande (softprompt.dnd.cloze.PRIMARY_MEASURE)")
    p.add_argument("--json", default="benchmarks/results/dnd_cloze.json")
    p.add_argument("--md", default="benchmarks/results/dnd.md")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.cmd == "cloze":
        return cmd_cloze(args)
    if args.cmd == "cloze-report":
        return cmd_cloze_report(args)
    if args.cmd == "gen-bench":
        return cmd_gen_bench(args)
    if args.cmd == "boolq-probe":
        return cmd_boolq_probe(args)
    if args.cmd == "convert":
        convert(Path(args.gguf), Path(args.out))
        return 0
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "export":
        res = export_results(Path(args.state), Path(args.out))
        print(f"exported {len(res['status']['done'])} stages to {args.out}")
        return 0
    if args.cmd == "report":
        text = render(json.loads(Path(args.results).read_text()))
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text, end="")
        return 0
    return cmd_plan(args)


if __name__ == "__main__":
    sys.exit(main())
