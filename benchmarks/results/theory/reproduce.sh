#!/usr/bin/env bash
# Reproduce the committed theory-lab results (docs/theory.md).
#   usage: benchmarks/results/theory/reproduce.sh [OUTDIR] [DEVICE] [CONFIG...]
# Trained curves were made on one H100 (DEVICE=cuda, ~5-7 min per config); on a
# 2-core CPU expect hours. Theory + Monte-Carlo alone take seconds to minutes.
# Needs `softprompt` importable (pip install -e . or PYTHONPATH=src).
set -euo pipefail
OUT=${1:-benchmarks/results/theory}
DEVICE=${2:-cuda}
shift $(( $# > 2 ? 2 : $# )) || true
CONFIGS=${*:-"zero_cov_12 nonzero_cov_11 noisy_nonzero_cov_11"}
SP="python3 -m softprompt.theory.cli"
mkdir -p "$OUT"

# Spec protocol: Adam lr 1e-3, batch 3072 per task, step decay x0.1 at 60%/85%, no weight
# decay, 8 restarts trained in parallel (best kept), 20k steps (FT: 20k PT + 20k prompt-only).
# Prompt+heads (dec) uses lr 1e-2: at 1e-3 it is still 10-24% above theory after 20k steps.
# nonzero_cov_11's dec needs 60k steps (at 20k, n=10 and n=20 were stuck 9% and 18% above).
COMMON="--n 1,10,20,30,40,50 --train --device $DEVICE --steps 20000 --runs 8 --lr 1e-3 \
  --regime-lr dec=0.01 --eval-batches 50 --mc --mc-draws 400000 --quiet"
for cfg in $CONFIGS; do
  [ "$cfg" = noisy_nonzero_cov_11 ] && continue  # theory + Monte-Carlo only, below
  extra=""
  # Non-zero global mean: also report JT + global centring (what the shared u_x of KQV can reach).
  [ "$cfg" = nonzero_cov_11 ] && extra="--regime-steps dec=60000 --regimes pt,ft,jt,dec,jt_gc"
  $SP curves --config "$cfg" $COMMON $extra --json "$OUT/$cfg.json" --plot "$OUT/$cfg.png"
done

# 2. Noisy configuration, theory + Monte-Carlo only (CPU, about two minutes; no GPU needed).
case " $CONFIGS " in *" noisy_nonzero_cov_11 "*)
$SP curves --config noisy_nonzero_cov_11 --n 1,3,5,7,10,15,20 --regimes pt,ft,jt,dec,oracle,jt_gc \
  --mc --mc-draws 200000 --threads 1 --json "$OUT/noisy_nonzero_cov_11.json" --plot "$OUT/noisy_nonzero_cov_11.png" --quiet
;; esac
