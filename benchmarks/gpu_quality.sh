#!/usr/bin/env bash
# The MiniLM quality runs of issues 2-5 on a lent GPU machine, spread over consecutive device calls of one lease.
#
#   benchmarks/gpu_quality.sh start [DEADLINE_S]   unpack the carried model + data into $STATE, start the runs in the
#                                                  background (setsid: they outlive the call while the machine is kept)
#   benchmarks/gpu_quality.sh collect WAIT_S       wait WAIT_S seconds, then pack what has finished into $OUT
#
# Carry: .carry/minilm (benchmarks/make_carry.sh) and .carry/qdata.tar.xz (GLUE, SuperGLUE with FewGLUE, CoNLL-2003
# and the prefix-representation data; docs/STATUS.md says how it is built). Runs: the suites of baselines.py (core,
# apt, idspam, sweep; 3 seeds, 13 at a time, bf16) and prefix_representations.py --budget full (4 workers).
# Unpack the tarballs locally into benchmarks/results/runs/ and runs/prefrep-full/ and rebuild the tables.
set -u
STATE=${STATE:-$HOME/sp_state}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src SOFTPROMPT_DATA_DIR=$STATE/qdata

case "${1:-}" in
start)
  deadline=${2:-1500}
  mkdir -p "$STATE"
  tar xJf .carry/qdata.tar.xz -C "$STATE"
  cp -r .carry/minilm "$STATE/minilm"
  cp -r benchmarks src "$STATE/"  # the code the background runs use, frozen at start
  mkdir -p "$STATE/runs" && cp benchmarks/results/runs/*.json "$STATE/runs/"  # finished runs are not redone
  cd "$STATE"
  export PYTHONPATH=$STATE/src
  setsid nohup python benchmarks/baselines.py run --suites "${SUITES:-core,apt,idspam,sweep}" --seeds 1,2,3 \
    --model "$STATE/minilm" --model-label .carry/minilm --out "$STATE/runs" --parallel "${PARALLEL:-13}" --bf16 --deadline "$deadline" \
    > "$STATE/baselines.log" 2>&1 < /dev/null &
  # One CPU thread per process here too: the machine's cores are shared with the baseline runs.
  [ "${PREFREP:-1}" = 1 ] && OMP_NUM_THREADS=1 setsid nohup python benchmarks/prefix_representations.py --budget full \
    --model "$STATE/minilm" --work "$STATE/prefrep" --time-limit "$deadline" --no-progress --threads 2 \
    --parallel "${PREFREP_PARALLEL:-4}" --stages bank,update,main,throughput \
    > "$STATE/prefrep.log" 2>&1 < /dev/null &
  sleep 5
  echo "started; $(nproc) cores"; nvidia-smi --query-gpu=name,memory.used --format=csv
  ;;
collect)
  sleep "${2:-0}"
  cd "$STATE"
  echo "finished runs: $(ls runs/*.json 2>/dev/null | wc -l)"; tail -n 5 baselines.log; tail -n 3 prefrep.log
  grep -c FAILED baselines.log
  grep -A8 FAILED baselines.log | head -40
  # Results JSON of every run, the logs, the APT adapters the gate heat maps need (RTE, CoNLL, seed 1) and an
  # SST-2 ID-SPAM adapter for the explanation example.
  tar czf "$OUT/runs.tgz" runs/*.json baselines.log prefrep.log \
    $(ls -d runs/adapters/glue_rte__apt__1 runs/adapters/conll2003__apt__1 runs/adapters/glue_sst2__idspam__1 \
      2>/dev/null)
  python - <<'PY'
import os, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from prefix_representations import export
if Path("prefrep").exists():
    export(Path("prefrep"), Path(os.environ["OUT"]) / "prefrep.tgz")
PY
  ls -la "$OUT"
  ;;
*)
  echo "usage: $0 start [DEADLINE_S] | collect WAIT_S" >&2; exit 2 ;;
esac
