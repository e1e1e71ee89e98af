"""The budgets of ``prefix_representations.py``: the repository root, the source tasks, and per budget (``small``
on the CPU, a seconds-long ``smoke`` check, ``full`` on a GPU) the sources and targets, seeds and seed mode, prefix
and multi-task training settings, data limits, probes and throughput settings. No package imports, so that the
script can read them before it puts the checkout's ``src`` on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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
