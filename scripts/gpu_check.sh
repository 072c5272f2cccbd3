#!/usr/bin/env bash
# The GPU check of issue 3: policy matrix on CUDA against HF, then a short OPT-1.3B benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 exec python3 -m engine.bench.gpu_check "$@"
