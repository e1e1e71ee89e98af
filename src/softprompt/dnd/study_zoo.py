"""Zoo stages of the cloze study in parallel processes on one GPU (issue 21: the zoo is rebuilt every session).

A zoo stage (250 LoRA steps of SmolLM2-135M at batch 32, 50 saves, dev and test scoring) is bound by kernel
launches and host work, not by the GPU: on the H200 of 2026-12-04 its steps took ~130 ms for ~1.5 TFLOP (ARC-sized
batches), about 12 TFLOP/s. ``workers`` spawned processes (each its own CUDA context and CPU core) train that many
datasets at once and fill the GPU's idle time. Each process runs exactly the sequential stage's code
(:meth:`.study.Study.run_zoo`, same seeds), so a stage's result does not depend on the worker count (GPU rounding
aside). Measured on an H100 (80 GB) on 2026-12-05: 4 workers ran out of memory (BoolQ's worker, 32 x ~700 tokens,
held 37 GB beside three others and the parent's 16 GB cache); 2 workers rebuilt five stages in 303 s
(``docs/dnd_gpu.md``).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from typing import Any

Study = Any  # a softprompt.dnd.study.Study (not imported: study imports this module)


def _zoo_job(study_class: type, kwargs: dict[str, Any], stage: str) -> str:
    """Worker: run one zoo stage of a study rebuilt from its class and constructor arguments (the class travels by
    reference, so this module never imports :mod:`.study`); writes the stage JSON."""
    st = study_class(**kwargs, log=lambda m: print(f"[{stage}] {m}", flush=True))
    _, name, dataset = stage.split(":")
    cfg = next(c for c in st.configs if c["name"] == name)
    s0 = time.time()
    res = st.run_zoo(cfg, dataset)
    res["seconds"] = round(time.time() - s0, 2)
    res["formats"] = st.formats(stage)
    st.path(stage).write_text(json.dumps(res) + "\n")
    return stage


def run_zoos_parallel(study: Study, stages: list[str], seconds: float, workers: int) -> list[str]:
    """Run ``stages`` (zoo stages of ``study``) in ``workers`` spawned processes, at most ``seconds``: at the
    deadline the pool is terminated (stages not written then are redone by a later call). A stage whose worker ran
    out of GPU memory beside the others runs again afterwards with fewer workers (alone at last), so a worker count
    that is one too many for the card costs time, not the call. Other worker exceptions are raised here. Returns the
    stages that finished."""
    import torch

    if torch.cuda.is_available():  # the parent's cached blocks (e.g. from the base stage) would crowd the workers
        torch.cuda.empty_cache()
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be re-initialised in a forked child
    t_end = time.time() + seconds
    pool = ctx.Pool(max(1, workers), maxtasksperchild=1)  # a fresh process (and GPU memory) per stage
    retry = []
    try:
        jobs = [pool.apply_async(_zoo_job, (type(study), study.init_kwargs, s)) for s in stages]
        for stage, j in zip(stages, jobs):
            try:
                j.get(timeout=max(0.0, t_end - time.time()))
            except multiprocessing.TimeoutError:
                study.log(f"zoo workers: deadline reached; {sum(not study.done(s) for s in stages)} stage(s) left")
                break
            except torch.OutOfMemoryError:
                study.log(f"zoo workers: {stage} ran out of GPU memory beside {workers - 1} other worker(s); it "
                          "runs again with fewer")
                retry.append(stage)
    finally:
        pool.terminate()
        pool.join()
    if retry and workers > 1 and time.time() < t_end:
        run_zoos_parallel(study, retry, t_end - time.time(), max(1, min(workers - 1, len(retry))))
    return [s for s in stages if study.done(s)]


__all__ = ["run_zoos_parallel"]
