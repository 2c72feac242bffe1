#!/usr/bin/env bash
# The accelerator run in one go (see benchmarks/accelerator.py): MFU of a 7B-shaped train step against the
# device's bf16 peak and transformers, and 7B-shaped decode against the HBM bandwidth. Run from the
# repository root on a GPU machine with the project installed; it stops itself after ACCELERATOR_TIMEOUT
# seconds (default 540) and prints its numbers as it goes, the last line as JSON.
#
#   bash benchmarks/accelerator.sh                   # defaults: 4 train layers x 4096 tokens, 8 decode layers
#   bash benchmarks/accelerator.sh --layers=2        # any option of `python -m benchmarks.accelerator`
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
exec timeout --signal=INT --kill-after=30 "${ACCELERATOR_TIMEOUT:-540}" "$PYTHON" -m benchmarks.accelerator "$@"
