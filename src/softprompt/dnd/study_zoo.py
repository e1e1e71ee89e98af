"""Zoo stages of the cloze study in parallel processes on one GPU (issue 21: the zoo is rebuilt every session).

A zoo stage (250 LoRA steps of SmolLM2-135M at batch 32, 50 saves, dev and test scoring) is bound by kernel
launches and host work, not by the GPU: on the H200 of 2026-12-04 its steps took ~130 ms for ~1.5 TFLOP (ARC-sized
batches), about 12 TFLOP/s. ``workers`` spawned processes (each its own CUDA context and CPU core) train that many
datasets at once and fill the GPU's idle time. Each process runs exactly the sequential stage's code
(:meth:`.study.Study.run_zoo`, same seeds), so a stage's result does not depend on the worker count (GPU rounding
aside). Measured on an H100 (80 GB) on 2026-12-05: 4 workers ran out of memory (BoolQ's worker, 32 x ~700 tokens,
held 37 GB beside three others and the parent's 16 GB cache); 2 workers rebuilt five stages in 303 s. On
2026-12-05 (session 14) 3 workers took 360 s for all seven: BoolQ, started third, ran out of memory when HellaSwag
and PIQA joined it and ran again alone after the pool. Hence the longest-first start, the memory check from
recorded peaks, and a rerun that does not wait for the pool (``docs/dnd_gpu.md``).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from typing import Any

Study = Any  # a softprompt.dnd.study.Study (not imported: study imports this module)


def _zoo_job(study_class: type, kwargs: dict[str, Any], stage: str, workers: int = 1) -> str:
    """Worker: run one zoo stage of a study rebuilt from its class and constructor arguments (the class travels by
    reference, so this module never imports :mod:`.study`); writes the stage JSON, its profile noting ``workers``
    (its optimiser seconds were timed while up to that many stages shared the GPU)."""
    st = study_class(**kwargs, log=lambda m: print(f"[{stage}] {m}", flush=True))
    _, name, dataset = stage.split(":")
    cfg = next(c for c in st.configs if c["name"] == name)
    s0 = time.time()
    res = st.run_zoo(cfg, dataset)
    last_build(res).setdefault("profile", {})["zoo_workers"] = workers
    res["seconds"] = round(time.time() - s0, 2)
    res["formats"] = st.formats(stage)
    st.path(stage).write_text(json.dumps(res) + "\n")
    return stage


def last_build(result: dict[str, Any]) -> dict[str, Any]:
    """The record of a zoo stage's last build: its latest rebuild check, else the stage result itself (both carry
    that build's ``profile``: seconds, peak memory, worker count)."""
    return result["rebuilds"][-1] if result.get("rebuilds") else result


def _recorded(study: Study, stage: str, key: str) -> float | None:
    """``key`` of the profile of the stage's last recorded build, or None."""
    if not study.recorded(stage):
        return None
    return (last_build(study.result(stage)).get("profile") or {}).get(key)


def fits(peak: float | None, running: list[float | None], budget: float | None) -> bool:
    """Whether a stage of recorded peak ``peak`` GiB may start beside stages of peaks ``running`` on a card with
    ``budget`` GiB: always when nothing runs, and whenever a figure is unknown (the worker count limits alone)."""
    if not running or budget is None or peak is None or None in running:
        return True
    return sum(map(_need, running)) + _need(peak) <= budget


def to_start(order: list[str], running: list[str], peak: dict[str, float | None], alone: set[str], workers: int,
             budget: float | None) -> list[str]:
    """The stages of ``order`` to start now beside ``running``, first fit in order: at most ``workers`` at once,
    each only if it :func:`fits`; a stage of ``alone`` starts only on an idle card, and nothing starts beside it."""
    started: list[str] = []
    for stage in order:
        now = [*running, *started]
        if len(now) >= max(1, workers) or (now and (stage in alone or alone.intersection(now))):
            break
        if fits(peak[stage], [peak[s] for s in now], budget):
            started.append(stage)
    return started


def _need(peak: float) -> float:
    """GiB a worker holds for a stage of recorded peak ``peak`` (max_memory_allocated): the allocator's reserve
    above it and the process's CUDA context (estimates)."""
    return 1.15 * peak + 0.6


def run_zoos_parallel(study: Study, stages: list[str], seconds: float, workers: int) -> list[str]:
    """Run ``stages`` (zoo stages of ``study``) in at most ``workers`` spawned processes at once, at most ``seconds``:
    at the deadline the pool is terminated (stages not written then are redone by a later call).

    The longest stages (recorded build seconds) start first, and a stage starts only while the recorded peak GPU
    memory of those running beside it fits the card (:func:`fits`). A stage whose worker still runs out of memory
    runs again alone, so a worker count that is one too many for the card costs time, not the call; out of memory
    alone, and any other worker exception, is raised here. Returns the stages that finished."""
    import torch

    budget = None
    if torch.cuda.is_available():  # the parent's cached blocks (e.g. from the base stage) would crowd the workers
        torch.cuda.empty_cache()
        budget = torch.cuda.mem_get_info()[0] / 2**30
    order = sorted(stages, key=lambda s: -(_recorded(study, s, "build_s") or 0.0))  # stable: unknown keep order
    peak = {s: _recorded(study, s, "peak_gib") for s in stages}
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be re-initialised in a forked child
    t_end = time.time() + seconds
    pool = ctx.Pool(max(1, workers), maxtasksperchild=1)  # a fresh process (and GPU memory) per stage
    running: dict[str, Any] = {}
    beside: dict[str, int] = {}  # how many workers ran when a stage started
    alone: set[str] = set()  # stages that ran out of memory beside others
    try:
        while order or running:
            if time.time() >= t_end:
                study.log(f"zoo workers: deadline reached; {sum(not study.done(s) for s in stages)} stage(s) left")
                break
            for stage in to_start(order, list(running), peak, alone, workers, budget):
                order.remove(stage)
                beside[stage] = len(running)
                running[stage] = pool.apply_async(_zoo_job, (type(study), study.init_kwargs, stage, workers))
            for stage, job in list(running.items()):
                if not job.ready():
                    continue
                del running[stage]
                try:
                    job.get()
                except torch.OutOfMemoryError:
                    if beside[stage] == 0:  # alone on the card: more tries cannot help
                        raise
                    study.log(f"zoo workers: {stage} ran out of GPU memory (started beside {beside[stage]} other "
                              "worker(s)); it runs again alone")
                    alone.add(stage)
                    order.insert(0, stage)
            time.sleep(0.05)
    finally:
        pool.terminate()
        pool.join()
    return [s for s in stages if study.done(s)]


__all__ = ["fits", "last_build", "run_zoos_parallel", "to_start"]
