#!/usr/bin/env bash
# The engine on one GPU, from this source tree, on the machine's own torch and transformers:
# correctness vs generate in fp32, bf16 agreement on the toy model, images/s at batch 64/128/256.
# Installs nothing; bounded to 5 minutes. Without a GPU it is a CPU dry run at the smallest sizes.
# Usage: scripts/gpu-check.sh [BATCH ...]   (PYTHON=python3.12 to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 295 "${PYTHON:-python3}" scripts/gpu_check.py "$@"
