"""The stages of the resumable ``run`` of ``benchmarks/dnd_bench.py`` (split out of it, unchanged): ``BenchStages``
holds a state's stage list, stage files and time estimates, the fixed evaluation subsets and condition prompts, and
the ``base``, ``zoo:<d>`` and ``gen:<h>``/``ans:<h>`` stages (LoRA zoo, generator training, generated adapters,
ablations). ``dnd_bench.Bench`` subclasses it with the driver loop, which reads the process clock there."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import statistics
import time
from pathlib import Path

from dnd_bench_common import PRIORS, sha_rank, short, write_json
from dnd_bench_model import Evaluator, condition_text


# --------------------------------------------------------------------------------------------------------- bench
class BenchStages:
    """Everything of ``dnd_bench.Bench`` but its driver loop (``run_stage``, ``run``, which read the process
    clock ``dnd_bench.T_START``): the stage list and files, estimates, data, and the base/zoo/gen stages."""

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
        info = {"n_test": len(recs), "n_eval": n,
                "eval_sha256": hashlib.sha256(json.dumps(ev_idx).encode()).hexdigest(),
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
                      tokenizer=tok, progress=False,
                      curve_steps=[s for s in curve_steps if s <= int(cfg["warmup_steps"])],
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
