#!/usr/bin/env bash
# Issue 19's next GPU call, in one command that stays within one device call (600 s): the CUDA-graph check, the
# three servers with CUDA graphs on a finer grid, and a profile of the decoding step (mixed against bare).
# Every part writes into $OUT as it finishes, so a call cut short keeps what it finished.
#
#   device tool `run`, kind nvidia-h200, carry [".dnd_src"], timeout_s 600:
#     bash .dnd_src/benchmarks/gpu_serve_next.sh qwen0.5b-random
#   (SmolLM2: the two GGUF calls of benchmarks/results/serve_generation.md first, then `... smollm2` with
#    SOFTPROMPT_HOME=$HOME/dnd_state/home and PYTHONPATH including $HOME/dnd_state/site)
#
# Build .dnd_src from HEAD first: rm -rf .dnd_src && mkdir .dnd_src && git archive HEAD src benchmarks | tar -x -C .dnd_src
# Then here: copy $OUT/sg_graphs3.json to benchmarks/results/ and run
#   python benchmarks/serve_generation.py report --results <file> --markdown <table.md> --plot <plot.png>
set -u
MODEL=${1:?usage: $0 MODEL (qwen0.5b-random or smollm2)}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$HERE/../src${PYTHONPATH:+:$PYTHONPATH}"
cd "$HERE/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# 0. One decoding attention call on grouped heads under a mask, transformers 5.17's key/value copy per query head
#    against the engine's packed call (a few seconds).
timeout 60 python3 benchmarks/gqa_decode_attention.py --out "$OUT/gqa_decode_attention.json" 2>&1 | tail -8
# 1. Graphs against the dynamic cache: float32 rows must agree exactly (exit 1 otherwise: then the sweep still runs,
#    but its numbers are not to be trusted).
timeout 90 python3 benchmarks/serve_generation.py check --model "$MODEL" --decoding cuda_graphs --dtype float32 \
  --requests 32 --max-rows 16 2>&1 | grep --line-buffered -v Loading | tail -1
echo "check rc=${PIPESTATUS[0]}"
# 2. The sweep: all three servers with CUDA graphs (about 10-20 s per point).
python3 benchmarks/serve_generation.py run --model "$MODEL" --modes mixed,bare,per_adapter \
  --rates ${RATES:-2,4,32,48,64,96,128} --duration 8 --max-overrun 2 --decoding cuda_graphs --max-context 256 \
  --time-budget $((480 - SECONDS)) --out "$OUT/sg_graphs3.json" 2>&1 | grep --line-buffered -v Loading | cut -c1-300
# 3. What a decoding step spends on the device, mixed against bare (if time is left). Session 9 profiled the eager
#    step (PROFILE_DECODING=dynamic PROFILE_ROWS=2,16); the open question is the graph-mode step at many rows
#    (mixed 7.3 ms against 6.3 ms bare at 64 rows on an H100).
if [ "$SECONDS" -lt 520 ]; then
  timeout $((580 - SECONDS)) python3 benchmarks/serve_decode_profile.py --model "$MODEL" \
    --rows "${PROFILE_ROWS:-16,64}" --decoding "${PROFILE_DECODING:-cuda_graphs}" \
    --out "$OUT/decode_profile.json" 2>&1 | grep --line-buffered -v Loading
fi
# 4. A step in which 4 requests join 32 decoding rows (prefill, copy into the buffers, decoding), mixed against bare:
#    at saturation such steps took 31 ms mixed against 26 ms bare (H100, session 9), the tokens/s gap's main suspect.
if [ "$SECONDS" -lt 560 ]; then
  timeout $((590 - SECONDS)) python3 benchmarks/serve_decode_profile.py --model "$MODEL" --rows 32 --join 4 \
    --decoding cuda_graphs --steps 10 --profile-steps 3 --out "$OUT/join_profile.json" 2>&1 | grep --line-buffered -v Loading
fi
ls -la "$OUT"
