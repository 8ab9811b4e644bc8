#!/usr/bin/env bash
# GPU checks of docs/precision_and_devices.md (issue #18): one line per check, under 8 minutes on one GPU.
#
#   bash scripts/gpu_check.sh                 # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --cpu-dry-run   # the same checks on CPU at tiny sizes (no GPU: the code paths run)
#
# Needs the package's dependencies; QLoRA needs bitsandbytes (pip install '.[bnb]') and the SmolLM2 checks the asset
# (scripts/install_assets.sh). A check whose requirement is missing prints "skipped" and why.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ "${1:-}" != "--cpu-dry-run" ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'
fi
python -c 'import torch, transformers, peft, accelerate; print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}, cuda {torch.version.cuda}")'
timeout 480 python scripts/gpu_check.py "$@"
