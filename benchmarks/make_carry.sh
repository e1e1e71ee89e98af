#!/usr/bin/env bash
# Build the git-ignored .carry/ folder that GPU calls carry (no Hub on the device, ../shared does not travel):
#   .carry/minilm        all-MiniLM-L6-v2 as an fp16 copy (~45 MB; loaded in float32 on the device)
#   .carry/data/glue/..  the GLUE train/dev files of the tasks given (default: SST-2 MRPC RTE CoLA)
# usage: benchmarks/make_carry.sh [TASK_FOLDER ...]     (run from the repo root, with the venv active)
set -euo pipefail
DATA=${SOFTPROMPT_DATA_DIR:-../shared/data}
TASKS=${*:-"SST-2 MRPC RTE CoLA"}
mkdir -p .carry/data/glue
cp "$DATA/README.md" .carry/data/
for t in $TASKS; do
  mkdir -p ".carry/data/glue/$t"
  cp "$DATA/glue/$t/train.tsv" "$DATA/glue/$t/dev.tsv" ".carry/data/glue/$t/"
done
python - <<'PY'
import torch
from transformers import AutoModel, AutoTokenizer
from softprompt.resources import minilm_dir
AutoModel.from_pretrained(minilm_dir(), dtype=torch.float16).save_pretrained(".carry/minilm")
AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(".carry/minilm")
PY
du -sh .carry
