#!/usr/bin/env bash
# One-command GPU check: a ~1B random Llama through uipe's own stages (FSDP2 unlearning in bf16 over NCCL, then 8
# search trials 4 to the GPU); prints tokens/s, MFU, peak GPU memory per rank and per trial, seconds per trial.
#   bash scripts/gpu_check.sh            # on a CUDA machine, within 8 minutes on one GPU
#   bash scripts/gpu_check.sh --smoke    # the same steps on CPU with a small model (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import uipe" 2>/dev/null; then
  echo "gpu_check: uipe is not installed for $PY; run the README's set-up command first" >&2
  exit 2
fi
if [ "${1:-}" != "--smoke" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
    echo "gpu_check: nvidia-smi failed: no CUDA GPU here (use --smoke)" >&2; exit 2; }
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 1)" || {
    echo "gpu_check: torch sees no CUDA GPU with bf16 (a CPU-only torch wheel?)" >&2; exit 2; }
fi
exec timeout 480 "$PY" scripts/gpu_check.py "$@"
