#!/usr/bin/env bash
# Data-parallel training speed (docs/PERFORMANCE.md, "Data-parallel training over MPI"): tokens/s
# of one process x 2 threads against 2 MPI processes x 1 thread at the same global batch
# (batch x accum 2: the 2 micro-batches accumulate in one process, or one per rank), with and
# without overlapping the gradient all-reduce with the backward; and the all-reduce bytes and
# times per step the tool prints. Run under the benchmark lock:
#   flock /tmp/bench.lock scripts/bench_mpi_train.sh [build/mambacpp]
set -euo pipefail
BIN=${1:-build/mambacpp}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
uptime
run() {  # run LABEL LAUNCHER... -- TRAIN-OPTIONS...
  local label=$1; shift
  local launch=()
  while [ "$1" != "--" ]; do launch+=("$1"); shift; done
  shift
  "${launch[@]}" "$BIN" train "$@" --eval-batches 0 --log-every 100000 --save "$OUT/run" \
    > "$OUT/log" 2>&1 || { cat "$OUT/log"; exit 1; }
  local tps ar
  tps=$(sed -n 's/.*s (\([0-9]*\) tok\/s.*/\1/p' "$OUT/log")
  ar=$(sed -n 's/gradient all-reduce per step: //p' "$OUT/log")
  printf '%-34s %8s tok/s   %s\n' "$label" "$tps" "$ar"
  rm -rf "$OUT/run"
}
MPI=(mpirun --oversubscribe --bind-to core -np 2)
SMALL=(--task selective-copy --seqlen 256 --batch 8 --accum 2 --steps 40 --warmup 5)
BIG=(--task selective-copy --seqlen 128 --batch 2 --accum 2 --steps 6 --warmup 1 --d_model 768
     --n_layer 4)
for shape in SMALL BIG; do
  declare -n A=$shape
  echo "== $shape: ${A[*]}"
  run "1 process x 2 threads" -- "${A[@]}" --threads 2
  run "2 processes x 1 thread" "${MPI[@]}" -- "${A[@]}" --threads 1
  run "2 processes x 1 thread, no overlap" "${MPI[@]}" -- "${A[@]}" --threads 1 --no-overlap
done
uptime
