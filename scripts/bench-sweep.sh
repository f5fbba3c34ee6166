#!/bin/bash
# The benchmark sweep behind docs/PERFORMANCE.md (SSD scaling, LM prefill/decode for every
# model x weight dtype x thread count, batched decode). Run it on an otherwise idle machine
# after building (`cmake --build build`). Usage: scripts/bench-sweep.sh [OUTDIR]
# Writes one JSON (or JSON-lines) file per command into OUTDIR (default bench-out/HHMM).
set -euo pipefail
cd "$(dirname "$0")/.."
O=${1:-bench-out/$(date +%H%M)}
mkdir -p "$O"
uptime > "$O/uptime_start.txt"
OMP_NUM_THREADS=2 build/bench_ssd --threads 2 --ref 0 --sweep 1 --layer 1 --reps 5 > "$O/ssd_t2.jsonl"
build/bench_gemm_nt --reps 7 > "$O/gemm_nt_t2.jsonl"
build/bench_gemm_nt --reps 5 --threads 1 > "$O/gemm_nt_t1.jsonl"
for m in mamba-130m mamba2-130m; do
  for dt in f32 bf16 f16 q8_0 q4_0; do
    for t in 2 1; do
      build/mambacpp bench --preset $m --prompt 512 --gen 128 --reps 3 --threads $t --dtype $dt --json \
        > "$O/lm_${m}_${dt}_t$t.json"
    done
  done
  # baseline in the same run: the projections' GEMM on OpenBLAS instead of ops/gemm_nt.h
  for dt in f32 bf16; do
    MAMBA_GEMM=blas build/mambacpp bench --preset $m --prompt 512 --gen 128 --reps 3 --threads 2 --dtype $dt --json \
      > "$O/lm_${m}_${dt}_t2_blasgemm.json"
  done
  for dt in f32 bf16; do
    for b in 1 4 16; do
      build/mambacpp bench --preset $m --prompt 64 --gen 64 --reps 3 --threads 2 --dtype $dt --batch $b --json \
        > "$O/batch_${m}_${dt}_b$b.json"
    done
  done
done
uptime > "$O/uptime_end.txt"
echo "$O"
