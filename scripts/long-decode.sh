#!/usr/bin/env bash
# Decodes 1,000,000 tokens of one sequence with small Mamba-1 and Mamba-2 models (CI runs the same
# test to 100,000): every logit finite, the step state equal to the full forward's at N = 10^3,
# 10^4, 10^5, 10^6, and RSS flat over each decode-only stretch (docs/RELIABILITY.md).
#   scripts/long-decode.sh [N]     (default 1000000; needs build/test_long_decode)
set -euo pipefail
cd "$(dirname "$0")/.."
MAMBA_LONG_DECODE_N=${1:-1000000} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} build/test_long_decode
