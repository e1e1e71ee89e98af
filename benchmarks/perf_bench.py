"""The :class:`Bench` of ``benchmarks/perf.py``: runs every case of the sections (interleaved training rounds,
gradient-checkpointing memory, long sequences, forward and ``generate()`` throughput) under the time budget, records
errors, refusals and OOMs as result rows, prints each row as it comes and rewrites the JSON after every case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from perf_measure import (
    Budget,
    _minus,
    _short,
    allocated_gib,
    cleanup,
    environment,
    flash_only_probe,
    peak_gib,
    profile_kernels,
    reset_peak,
    synchronize,
    time_loop,
)
from perf_models import (
    INFER_METHODS,
    ModelSpec,
    Refused,
    Shape,
    Skipped,
    build_base,
    make_batch,
    make_inference_model,
    make_method,
    model_flops,
    parse_shapes,
    shape_of,
)
from perf_report import _STREAM_WIDTHS, _base_row, format_table, targets
from portable import portable


class Bench:
    """Runs the cases, keeps the rows, prints them and rewrites the JSON after each one."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        self.args = args
        self.device = device
        self.dtype = dtype
        self.tiny: bool = args.tiny
        self.budget = Budget(args.time_budget, args.tiny)
        self.rows: list[dict] = []
        self.out = Path(args.out)
        self.shapes: dict[str, Shape] = {}
        self.meta: dict = environment(device, dtype)
        argv = sys.argv[1:] if args.argv is None else args.argv
        self.meta.update(argv=portable(argv), time_budget_s=args.time_budget, steps=args.steps, warmup=args.warmup,
                         rounds=args.rounds, virtual_tokens=args.virtual_tokens, tiny=args.tiny)
        self._header_printed = False

    # ---- bookkeeping ---------------------------------------------------------------------------------------------
    def add(self, row: dict) -> None:
        self.rows.append(row)
        if not self.args.quiet:
            if not self._header_printed:
                print(format_table([], _STREAM_WIDTHS).splitlines()[0], flush=True)
                self._header_printed = True
            print(format_table([row], _STREAM_WIDTHS).splitlines()[1], flush=True)
        self.write()

    def document(self) -> dict:
        return {"meta": self.meta, "results": self.rows, "targets": targets(self.rows)}

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.document(), indent=1, default=str))
        os.replace(tmp, self.out)

    def model_shape(self, spec: ModelSpec) -> Shape:
        if spec.name not in self.shapes:
            with torch.device("meta"):
                model = build_base(spec, self.tiny, torch.device("meta"), self.dtype)
            self.shapes[spec.name] = shape_of(spec, self.tiny, model)
            del model
        return self.shapes[spec.name]

    def run(self, section: str, base_row: dict, fn: Callable[[], dict], budget_key: str | None = None,
            add: bool = True) -> dict:
        """Run one case: budget check, errors and OOM recorded as rows, memory freed afterwards (``add``: log the
        row now; the interleaved training section logs its rows after the last round)."""
        key = budget_key or section
        row = {"section": section, **base_row}
        if not self.budget.allows(key, row["model"]):
            row.update(status="skipped", reason=f"time budget ({self.budget.remaining():.0f} s left, case needs "
                                                f"~{self.budget.estimate(key, row['model']):.0f} s)")
            if add:
                self.add(row)
            return row
        t0 = time.perf_counter()
        self.attempt(row, fn)
        cleanup(self.device)
        row["case_s"] = round(time.perf_counter() - t0, 2)
        if row["status"] != "skipped":
            self.budget.record(key, row["model"], row["case_s"])
        if add:
            self.add(row)
        return row

    @staticmethod
    def attempt(row: dict, fn: Callable[[], dict]) -> dict:
        """``row.update(fn())``; a refusal, a skip, an OOM or any error becomes the row's status and reason."""
        try:
            row.update(fn())
            row.setdefault("status", "ok")
        except Refused as exc:
            row.update(status="refused", reason=_short(exc))
        except Skipped as exc:
            row.update(status="skipped", reason=_short(exc))
        except torch.OutOfMemoryError as exc:
            row.update(status="oom", reason=_short(exc, 160))
        except Exception as exc:  # every failure is a result, never the end of the run
            oom = "out of memory" in str(exc).lower()
            row.update(status="oom" if oom else "error", reason=f"{type(exc).__name__}: {_short(exc)}")
        return row

    def seq_for(self, spec: ModelSpec, s: int) -> int:
        """Sequence length for ``spec``: RoBERTa (514 positions) is clamped so that the longest prompt still fits."""
        shape = self.model_shape(spec)
        if shape.max_positions is None:
            return s
        limit = shape.max_positions - 2 - self.args.virtual_tokens  # positions start after the pad id (RoBERTa)
        if s > shape.max_positions - 2:
            raise Skipped(f"sequence {s} exceeds {spec.name}'s {shape.max_positions} positions")
        return min(s, limit)

    # ---- cases -------------------------------------------------------------------------------------------------------
    def train_setup(self, spec: ModelSpec, method: str, b: int, s_req: int, gc_on: bool) -> dict:
        """Model, batch and AdamW of one training case, and its step (forward + backward + optimizer step)."""
        s = self.seq_for(spec, s_req)
        base = build_base(spec, self.tiny, self.device, self.dtype)
        model, params, extra = make_method(method, base, spec, gc_on, self.args.virtual_tokens)
        model.train()
        batch = make_batch(spec, self.model_shape(spec), b, s, self.device)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        opt = torch.optim.AdamW(params, lr=1e-5, **fused) if params else None
        # --compile: the model's forward (and so its backward) through torch.compile; "reduce-overhead" adds CUDA
        # graphs, aimed at small shapes whose steps wait on kernel launches. Compilation happens in the warm-up.
        forward = model
        if self.args.compile != "none":
            from softprompt.inductor import disable_mix_order_reduction

            disable_mix_order_reduction()  # as softprompt train does: what users run is what is timed
            forward = torch.compile(model, mode=self.args.compile)

        def step() -> None:
            out = forward(**batch, **extra)
            out.loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        return {"step": step, "model": model, "params": params, "batch": batch, "extra": extra, "opt": opt,
                "spec": spec, "method": method, "b": b, "s": s, "s_req": s_req}

    def train_row(self, case: dict, rounds: list[list[float]], truncated: bool, before: float | None,
                  peak: float | None) -> dict:
        """The row of a training case from its timed steps, one list per round: ``step_ms`` is the median of the
        round medians (with one round, the median step), so one slow round moves nothing."""
        spec, method, b, s = case["spec"], case["method"], case["b"], case["s"]
        shape = self.model_shape(spec)
        times = sorted(t for r in rounds for t in r)
        medians = [statistics.median(r) for r in rounds]
        ms = statistics.median(medians)
        seconds = ms / 1000.0
        peak_rate = self.meta["peak_flops"]
        full = method == "full_ft"
        row: dict = {
            "batch": b, "seq": s, "tokens_per_s": b * s / seconds, "step_ms": ms,
            "step_ms_min": times[0], "step_ms_max": times[-1], "timed_steps": len(times),
            "rounds": len(rounds), "step_ms_rounds": [round(m, 4) for m in medians],
            "step_ms_spread": [round(min(medians), 4), round(max(medians), 4)],
            "step_ms_iqr": [round(times[len(times) // 4], 4), round(times[(3 * len(times)) // 4], 4)],
            "peak_gib": peak, "weights_gib": before,
            "trainable_params": sum(p.numel() for p in case["params"]),
            "model_flops_per_step": model_flops(shape, b, s, "train"),
            "mfu": model_flops(shape, b, s, "train") / seconds / peak_rate,
            "mfu_needed": model_flops(shape, b, s, "train" if full else "needed") / seconds / peak_rate,
        }
        if self.args.compile != "none":
            row["compile"] = self.args.compile
        if s != case["s_req"]:
            row["note"] = f"seq {case['s_req']}->{s}: {spec.name} has {shape.max_positions} positions"
        if truncated:
            row["note"] = (row.get("note", "") + " timing cut short by the time budget").strip()
        return row

    def add_profile(self, row: dict, case: dict) -> None:
        """Profiled device time of one step (``device_ms``; None on CPU) and the share of the step the GPU was busy:
        well below 1 means the step waits on the host (launch-bound)."""
        row["profile"] = profile_kernels(case["step"], self.device)
        row["device_ms"] = row["profile"]["device_ms"] if row["profile"] else None
        if row["device_ms"] is not None:
            row["device_busy"] = round(row["device_ms"] / row["step_ms"], 3)

    def profiled(self, method: str) -> bool:
        return self.args.profile_method == "all" or method in self.args.profile_method.split(",")

    def train_case(self, spec: ModelSpec, method: str, b: int, s_req: int, gc_on: bool, steps: int, warmup: int,
                   profile: bool = False, longseq: bool = False) -> dict:
        """One method alone: forward + backward + AdamW step; median step time, tokens/s, peak memory, MFU."""
        case = self.train_setup(spec, method, b, s_req, gc_on)
        before = reset_peak(self.device)
        times, truncated = time_loop(case["step"], warmup, steps, self.device, self.budget.deadline())
        row = self.train_row(case, [times], truncated, before, peak_gib(self.device))
        if profile:
            self.add_profile(row, case)
        if longseq:
            row["attention"] = profile_kernels(case["step"], self.device, top=5)
            model, batch, extra = case["model"], case["batch"], case["extra"]

            def fwd() -> None:
                model(**{k: v for k, v in batch.items() if k != "labels"}, **extra)

            ok, why = flash_only_probe(fwd, self.device)
            row["flash_only_forward"] = ok
            if why:
                row["flash_only_reason"] = why
        case.clear()
        return row

    def train_interleaved(self, spec: ModelSpec, methods: list[str], b: int, s: int) -> None:
        """Every method at one shape, timed in ``--rounds`` rounds, A B C ... A B C ...: a slow spell of the machine
        hits every method instead of one. The methods' models stay alive between rounds (built once; round 1 warms
        up with ``--warmup`` steps, later rounds with one). Peak and weight memory are measured in round 1 minus
        what the methods built before were holding (they are idle, so their allocation does not change)."""
        rows: dict[str, dict] = {}
        live: dict[str, dict] = {}
        for method in methods:
            held: dict = {}

            def first(method: str = method, held: dict = held) -> dict:
                others = allocated_gib(self.device)
                case = self.train_setup(spec, method, b, s, False)
                before = reset_peak(self.device)
                times, truncated = time_loop(case["step"], self.args.warmup, self.args.steps, self.device,
                                             self.budget.deadline())
                held.update(case=case, rounds=[times], truncated=truncated, before=_minus(before, others),
                            peak=_minus(peak_gib(self.device), others))
                return {}

            rows[method] = self.run("train", _base_row(spec, method, b, s, False), first, add=False)
            if rows[method]["status"] == "ok":
                live[method] = held
            else:
                held.clear()
                cleanup(self.device)
        for _ in range(1, max(1, self.args.rounds)):
            # Whole rounds only: a round costs about (steps + 1) median steps of every live method.
            need = sum((self.args.steps + 1) * statistics.median(h["rounds"][0]) for h in live.values()) / 1000.0
            if not live or (self.budget.seconds and self.budget.remaining() < 1.15 * need + 5.0):
                for h in live.values():
                    h["cut"] = True
                break
            for method, h in list(live.items()):
                def more(h: dict = h) -> dict:
                    times, truncated = time_loop(h["case"]["step"], 1, self.args.steps, self.device,
                                                 self.budget.deadline())
                    h["rounds"].append(times)
                    h["truncated"] |= truncated
                    return {}

                if self.attempt(rows[method], more)["status"] != "ok":
                    live.pop(method)["case"].clear()
                    cleanup(self.device)
        for method, h in live.items():
            row = rows[method]
            self.attempt(row, lambda h=h: self.train_row(h["case"], h["rounds"], h["truncated"], h["before"],
                                                         h["peak"]))
            if h.get("cut") and len(h["rounds"]) < self.args.rounds:
                row["note"] = (row.get("note", "") + f" {len(h['rounds'])} of {self.args.rounds} rounds "
                               "(time budget)").strip()
            if row["status"] == "ok" and self.profiled(method):
                self.attempt(row, lambda h=h, row=row: self.add_profile(row, h["case"]) or {})
        for h in live.values():
            h["case"].clear()
        cleanup(self.device)
        for method in methods:
            self.add(rows[method])

    def forward_case(self, spec: ModelSpec, method: str, b: int, s_req: int) -> dict:
        """No-grad forward throughput."""
        s = self.seq_for(spec, s_req)
        shape = self.model_shape(spec)
        base = build_base(spec, self.tiny, self.device, self.dtype)
        model, extra = make_inference_model(method, base, spec, self.args.virtual_tokens)
        batch = make_batch(spec, shape, b, s, self.device, labels=False)

        def fwd() -> None:
            with torch.no_grad():
                model(**batch, **extra)  # noqa: F821 - bound above, deleted at the end

        before = reset_peak(self.device)
        times, truncated = time_loop(fwd, self.args.warmup, self.args.steps, self.device, self.budget.deadline())
        ms = statistics.median(times)
        row = {"batch": b, "seq": s, "tokens_per_s": b * s / (ms / 1000.0), "step_ms": ms, "timed_steps": len(times),
               "peak_gib": peak_gib(self.device), "weights_gib": before,
               "mfu": model_flops(shape, b, s, "forward") / (ms / 1000.0) / self.meta["peak_flops"]}
        if self.args.compile != "none":
            row["compile"] = self.args.compile
        if s != s_req:
            row["note"] = f"seq {s_req}->{s}: {spec.name} has {shape.max_positions} positions"
        if truncated:
            row["note"] = (row.get("note", "") + " timing cut short by the time budget").strip()
        del model, base, batch
        return row

    def generate_case(self, spec: ModelSpec, method: str, b: int, prompt: int, new: int) -> dict:
        """Greedy ``generate()``: new tokens per second (prefill included), wall clock."""
        shape = self.model_shape(spec)
        base = build_base(spec, self.tiny, self.device, self.dtype)
        model, _ = make_inference_model(method, base, spec, self.args.virtual_tokens)
        ids = make_batch(spec, shape, b, prompt, self.device, labels=False)["input_ids"]
        mask = torch.ones_like(ids)
        pad = base.config.eos_token_id if base.config.eos_token_id is not None else 0
        produced: list[int] = []

        def gen() -> None:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,  # noqa: F821 - bound above, deleted at the end
                                 do_sample=False, pad_token_id=pad)
            produced.append(int(out.shape[1] - ids.shape[1]))  # noqa: F821 - bound above, deleted at the end

        before = reset_peak(self.device)
        gen()  # warm-up
        times = []
        for _ in range(max(1, min(3, self.args.steps))):
            synchronize(self.device)
            t = time.perf_counter()
            gen()
            synchronize(self.device)
            times.append((time.perf_counter() - t) * 1000.0)
            if time.perf_counter() > self.budget.deadline():
                break
        ms = statistics.median(times)
        n_new = produced[-1]
        row = {"batch": b, "seq": prompt, "new_tokens": n_new, "tokens_per_s": b * n_new / (ms / 1000.0),
               "step_ms": ms, "timed_steps": len(times), "peak_gib": peak_gib(self.device), "weights_gib": before}
        if n_new != new:
            row["note"] = f"produced {n_new} of {new} new tokens"
        del model, base, ids
        return row

    # ---- sections ----------------------------------------------------------------------------------------------
    def section_train(self, specs: list[ModelSpec], methods: list[str]) -> None:
        for spec in specs:
            for b, s in parse_shapes(self.args.shapes):
                self.train_interleaved(spec, methods, b, s)

    def section_memory(self, specs: list[ModelSpec], methods: list[str]) -> None:
        steps, warmup = max(1, min(self.args.steps, 5)), min(self.args.warmup, 2)
        for spec in specs:
            for b, s in parse_shapes(self.args.gc_shapes):
                for method in methods:
                    row = self.run("memory", _base_row(spec, method, b, s, True),
                                   lambda: self.train_case(spec, method, b, s, True, steps, warmup))  # noqa: B023 - run at once
                    if row["status"] == "refused":  # measure what the method can do: without checkpointing
                        self.run("memory", {**_base_row(spec, method, b, s, False),
                                            "note": "checkpointing refused; run without it"},
                                 lambda: self.train_case(spec, method, b, s, False, steps, warmup))  # noqa: B023 - run at once

    def section_longseq(self, specs: list[ModelSpec]) -> None:
        steps, warmup = max(1, min(self.args.steps, 5)), min(self.args.warmup, 2)
        methods = [m for m in self.args.longseq_methods.split(",") if m]
        for spec in [x for x in specs if x.causal]:
            for s in [int(x) for x in self.args.longseq.split(",") if x]:
                for method in methods:
                    self.run("longseq", _base_row(spec, method, 1, s, False),
                             lambda: self.train_case(spec, method, 1, s, False, steps, warmup, longseq=True))  # noqa: B023 - run at once

    def section_inference(self, specs: list[ModelSpec]) -> None:
        (b, s), = parse_shapes(self.args.infer_shape)
        (gb, gs), = parse_shapes(self.args.gen_shape)
        for spec in specs:
            for method in INFER_METHODS:
                self.run("forward", _base_row(spec, method, b, s, False),
                         lambda: self.forward_case(spec, method, b, s))  # noqa: B023 - run at once
        for spec in [x for x in specs if x.causal]:
            for method in INFER_METHODS:
                row = _base_row(spec, method, gb, gs, False)
                row["shape"] += f"+{self.args.gen_tokens}"
                self.run("generate", row, lambda: self.generate_case(spec, method, gb, gs, self.args.gen_tokens))  # noqa: B023 - run at once
