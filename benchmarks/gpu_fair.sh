#!/usr/bin/env bash
# Issue 23's fair GLUE protocol (benchmarks/fair_glue.py) on a lent GPU machine, in one call that resumes from the
# committed state and brings the new state back.
#
#   benchmarks/gpu_fair.sh BUDGET_S      run for about BUDGET_S seconds (no run is started that would not finish),
#                                        then pack benchmarks/results/fair_glue_runs into $OUT/fair_state.tgz
#
# Carry: .carry_fair (git-ignored through .git/info/exclude; build it with `benchmarks/gpu_fair.sh carry` here):
#   .carry_fair/minilm          all-MiniLM-L6-v2 as an fp16 copy (loaded in float32 on the device)
#   .carry_fair/qdata.tar.xz    GLUE SST-2, MRPC, RTE, CoLA, STS-B (train + dev) and SuperGLUE CB
# Environment: STAGES (default readout,lr,seeds), ROWS (default: all rows, the issue's priority rows first),
# TASKS (default: the five tasks), PARALLEL (default 15: one run per CPU core of the 16, the scheduler beside them).
#
# Next session (device tool `run`, kind nvidia-h100-x1, carry [".carry_fair"], timeout_s 600; what is done and what
# is left: benchmarks/results/fair_glue_status.md):
#   STAGES=lr,seeds bash benchmarks/gpu_fair.sh 450
# then here: rm -rf benchmarks/results/fair_glue_runs && tar xzf <files_at>/fair_state.tgz -C benchmarks/results && \
#   python benchmarks/fair_glue.py report && python benchmarks/method_tables.py all && python benchmarks/fair_readme.py
# and commit benchmarks/results/fair_glue_runs, fair_glue.json and the regenerated tables.
set -u
if [ "${1:-}" = carry ]; then  # build .carry_fair here (needs ../shared/data and the venv)
  set -e
  D=${SOFTPROMPT_DATA_DIR:-../shared/data}; T=$(mktemp -d)
  mkdir -p .carry_fair "$T/qdata/glue" "$T/qdata/superglue/CB"
  cp "$D/README.md" "$T/qdata/"
  for t in SST-2 MRPC RTE CoLA STS-B; do mkdir -p "$T/qdata/glue/$t"; cp "$D/glue/$t/"{train,dev}.tsv "$T/qdata/glue/$t/"; done
  cp "$D"/superglue/CB/*.jsonl "$T/qdata/superglue/CB/"
  tar cJf .carry_fair/qdata.tar.xz -C "$T" qdata
  python - <<'PY'
import torch
from transformers import AutoModel, AutoTokenizer
from softprompt.resources import minilm_dir
AutoModel.from_pretrained(minilm_dir(), dtype=torch.float16).save_pretrained(".carry_fair/minilm")
AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(".carry_fair/minilm")
PY
  mkdir -p .git/info && touch .git/info/exclude
  grep -qx '/.carry_fair/' .git/info/exclude || echo '/.carry_fair/' >> .git/info/exclude
  du -sh .carry_fair; exit 0
fi
BUDGET=${1:?usage: $0 BUDGET_S | carry}
# REPLICATE="ROW=LR;ROW=LR" (with ROWS and TASKS naming the same rows and tasks): rerun those finished learning-rate
# runs into a scratch state and print each score beside the committed one (e.g. after a change of kernels: the
# engine scores without cuDNN attention since session 9, and earlier runs may have used it). Nothing committed changes.
SCRATCH=${SCRATCH:-/tmp/fair}
mkdir -p "$SCRATCH"
tar xJf .carry_fair/qdata.tar.xz -C "$SCRATCH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src SOFTPROMPT_DATA_DIR=$SCRATCH/qdata
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The scheduler stops starting runs at BUDGET; the outer timeout is a backstop that still leaves time to pack.
if [ -n "${REPLICATE:-}" ]; then
  REP=$SCRATCH/replica; mkdir -p "$REP"; cp benchmarks/results/fair_glue_runs/readout.json "$REP/"
  timeout $((BUDGET + 90)) python benchmarks/fair_glue.py run --model "$PWD/.carry_fair/minilm" --state "$REP" \
    --scratch "$SCRATCH/adapters" --parallel "${PARALLEL:-15}" --bf16 --time-budget "$BUDGET" --stages lr \
    --rows "$ROWS" --tasks "$TASKS" --grid-override "$REPLICATE" 2>&1 | tail -n 5
  python - "$REP" <<'PY' | tee "${OUT:-/tmp}/replicate.txt"
import json, sys
from pathlib import Path
for new in sorted(Path(sys.argv[1]).glob("lr__*.json")):
    old = Path("benchmarks/results/fair_glue_runs") / new.name
    a = json.loads(old.read_text())["score"] if old.exists() else None
    b = json.loads(new.read_text())["score"]
    diff = "n/a" if a is None or b is None else f"{100 * (b - a):+.2f} points"
    print(f"{new.stem}: committed {a}, rerun {b}, {diff}")
PY
  exit 0
fi
timeout $((BUDGET + 90)) python benchmarks/fair_glue.py run --model "$PWD/.carry_fair/minilm" \
  --model-label "all-MiniLM-L6-v2 (.carry_fair/minilm, fp16 copy loaded in float32)" \
  --state benchmarks/results/fair_glue_runs --scratch "$SCRATCH/adapters" --parallel "${PARALLEL:-15}" --bf16 \
  --time-budget "$BUDGET" --stages "${STAGES:-readout,lr,seeds}" ${ROWS:+--rows "$ROWS"} ${TASKS:+--tasks "$TASKS"} \
  2>&1 | tee "$SCRATCH/fair.log" | grep -v "^\[.*ok " | tail -n 60
grep -c " ok " "$SCRATCH/fair.log"
tar czf "${OUT:-/tmp}/fair_state.tgz" -C benchmarks/results fair_glue_runs
cp "$SCRATCH/fair.log" "${OUT:-/tmp}/fair.log"
ls -la "${OUT:-/tmp}"
