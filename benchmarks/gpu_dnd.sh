#!/usr/bin/env bash
# Issue 21's cloze study on a lent GPU: the calls of docs/dnd_gpu.md as one script, so that a session passes short
# command lines. State lives in $HOME/dnd_state, which the machine keeps only while it stays warm: the calls must
# follow each other within ~25 s. Build the carried folders here first: benchmarks/make_dnd_carry.sh (commit first).
#
#   bash benchmarks/gpu_dnd.sh A        carry [".carry/minilm", ".carry/dnd_data.tar.xz", ".dnd_src"]: data and
#                                       MiniLM, then gen-bench (GEN_BENCH=0 skips the bench; default: K=3, compiled
#                                       and eager)
#   bash benchmarks/gpu_dnd.sh B        carry [".gguf_parts/1"]: first half of the GGUF
#   bash benchmarks/gpu_dnd.sh C LEFT   carry [".gguf_parts/2", ".whl", ".dnd_src"]: reassemble, convert, restore the
#                                       committed stages, then run the study until this call's budget
#   bash benchmarks/gpu_dnd.sh D LEFT   carry [".dnd_src"]: go on (as often as needed)
#   bash benchmarks/gpu_dnd.sh E        carry [".dnd_src"]: with 3+ minutes left on the warm machine, time each
#                                       dataset's zoo step alone (dnd_bench.py zoo-alone: the cost table's lone
#                                       LoRA seconds; about 1-2 minutes); copy dnd_zoo_alone.json to benchmarks/results/
#
# LEFT: the session's device seconds left right before the call (the run tool's status: budget_left_s).
# Environment: GEN_STEP_SECONDS (default 0.35, or the BEST line of call A), GEN_COMPILE=1 (train the generators
# compiled, if call A's COMPILE line pays), ZOO_WORKERS (3), GEN_GROUP (3), STATS_ABLATION and NEAREST_ABLATION
# (datasets, or "all"), DRY_RUN=1 (print the study's command line instead of running anything).
# After each call, here: copy dnd_cloze_stages.json and dnd_cloze_invocations.jsonl from the call's files into
# benchmarks/results/, then run cloze-report and dnd_readme.py (docs/dnd_gpu.md, "After every call").
set -euo pipefail
CALL=${1:?usage: $0 A|B|C LEFT|D LEFT|E}
case $CALL in C|D) [ -n "${2:-}" ] || { echo "call $CALL needs LEFT: the run tool's budget_left_s" >&2; exit 2; } ;; esac
S=$HOME/dnd_state
export PYTHONUNBUFFERED=1 SOFTPROMPT_DATA_DIR=$S/data HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  PYTHONPATH=$PWD/.dnd_src/src:$S/site

study() {  # the cloze study, resumed from $S/cz; $1 = LEFT, the rest: extra options
  local left=$1; shift
  local cmd=(python3 benchmarks/dnd_bench.py cloze --state "$S/cz" --model "$S/smollm2"
    --configs "r8,lr2e-4,steps250,ckpt50" --zoo-workers "${ZOO_WORKERS:-3}" --generators --encoder "$S/minilm"
    --gen steps=1000,batch_size=64 --gen-group "${GEN_GROUP:-3}" --gen-streams
    --gen-step-seconds "${GEN_STEP_SECONDS:-0.35}" --session-left $((left - 90 - SECONDS)) --eval-batch 64
    --time-budget $((575 - SECONDS)) --export "${OUT:-/tmp/dnd_out}" "$@")
  if [ "${GEN_COMPILE:-0}" = 1 ]; then cmd+=(--gen-compile); fi
  if [ "${STATS_ABLATION:-}" = all ]; then cmd+=(--stats-ablation)
  elif [ -n "${STATS_ABLATION:-}" ]; then cmd+=(--stats-ablation "$STATS_ABLATION"); fi
  if [ "${NEAREST_ABLATION:-}" = all ]; then cmd+=(--nearest-ablation)
  elif [ -n "${NEAREST_ABLATION:-}" ]; then cmd+=(--nearest-ablation "$NEAREST_ABLATION"); fi
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; return 0; fi
  "${cmd[@]}"
}

case $CALL in
  A)
    mkdir -p "$S/data"
    cp -r .carry/minilm "$S/minilm"
    tar -xJf .carry/dnd_data.tar.xz -C "$S/data"
    (cd "$S/data" && sha256sum -c --quiet SHA256SUMS.dnd) && echo DND-A-OK
    if [ "${GEN_BENCH:-1}" != 0 ]; then
      python3 benchmarks/dnd_bench.py gen-bench --groups 3 --steps 4 --cudnn off --compile off,on --out "${OUT:-/tmp}"
    fi ;;
  B)
    mkdir -p "$S"
    cp .gguf_parts/1/smollm2.gguf.part1 .gguf_parts/1/SHA256SUMS "$S/"
    (cd "$S" && grep ' smollm2.gguf.part1$' SHA256SUMS | sha256sum -c -) && echo DND-B-OK ;;
  C)
    if [ -z "${DRY_RUN:-}" ]; then
      cp .gguf_parts/2/smollm2.gguf.part2 "$S/"
      cat "$S/smollm2.gguf.part1" "$S/smollm2.gguf.part2" > "$S/smollm2.gguf"
      (cd "$S" && sha256sum -c SHA256SUMS)
      python3 -m pip install -q --no-index --no-deps --target "$S/site" .whl/gguf-*.whl
      python3 benchmarks/dnd_bench.py convert --gguf "$S/smollm2.gguf" --out "$S/smollm2"
    fi
    study "$2" --restore benchmarks/results/dnd_cloze_stages.json ;;
  D)
    [ -n "${DRY_RUN:-}" ] || ls "$S/smollm2/config.json" > /dev/null
    study "$2" ;;
  E)
    cmd=(python3 benchmarks/dnd_bench.py zoo-alone --model "$S/smollm2" --config "r8,lr2e-4,steps250,ckpt50"
      --steps 20 --skip 3 --out "${OUT:-/tmp/dnd_out}")
    if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
    ls "$S/smollm2/config.json" > /dev/null
    "${cmd[@]}" ;;
  *)
    echo "unknown call $CALL: A, B, C LEFT, D LEFT or E" >&2; exit 2 ;;
esac
