#!/usr/bin/env bash
# `mpirun -np 2 mambacpp train --batch b --accum 2` (one micro-batch of b sequences per rank) must
# give, bit for bit, the run of one process with --batch b --accum 2: the same loss curve at every
# step (loss.csv: loss, lr, grad norm, accuracy, tokens) and the same final weights and AdamW
# moments (model.safetensors and optimizer.safetensors byte-identical). Also: accum 4 over 2 ranks
# is deterministic (two runs identical) and within fp32 rounding of one process; a bad accum is
# refused with a clear message.
source "$(dirname "$0")/common.sh" "$@"
STEPS=(--steps 12 --batch 4)
"$MAMBACPP" train "${MODEL[@]}" "${STEPS[@]}" --accum 2 --save "$WORK/one" > "$WORK/one.log"
"${MPIRUN[@]}" "$MAMBACPP" train "${MODEL[@]}" "${STEPS[@]}" --accum 2 --save "$WORK/two" \
  > "$WORK/two.log"
grep -q "1 threads x 2 processes" "$WORK/two.log" || fail "the MPI run did not run on 2 ranks"
grep -q "gradient all-reduce per step" "$WORK/two.log" || fail "no all-reduce figures printed"
[ "$(curve "$WORK/one" | wc -l)" -eq 13 ] || fail "loss.csv should have 12 steps"
diff <(curve "$WORK/one") <(curve "$WORK/two") || fail "loss curves differ (1 process vs 2)"
for f in model.safetensors optimizer.safetensors; do
  cmp "$WORK/one/$f" "$WORK/two/$f" || fail "$f differs (1 process vs 2)"
done
# The trainer_state.json of rank 0 alone: no other rank wrote anything into the folder.
[ "$(ls "$WORK/two" | sort | tr '\n' ' ')" = \
  "config.json loss.csv loss.svg model.safetensors optimizer.safetensors trainer_state.json " ] ||
  fail "unexpected files in the MPI run's folder: $(ls "$WORK/two")"

# accum 4 = 2 micro-batches per rank: deterministic, and equal to one process up to fp32 rounding
# of the gradient sum ((g0+g1)+(g2+g3) instead of ((g0+g1)+g2)+g3).
for r in a b; do
  "${MPIRUN[@]}" "$MAMBACPP" train "${MODEL[@]}" "${STEPS[@]}" --accum 4 --save "$WORK/four$r" \
    > "$WORK/four$r.log"
done
cmp "$WORK/foura/model.safetensors" "$WORK/fourb/model.safetensors" ||
  fail "two identical MPI runs (accum 4) differ"
"$MAMBACPP" train "${MODEL[@]}" "${STEPS[@]}" --accum 4 --save "$WORK/fourone" > "$WORK/fourone.log"
paste -d, <(cut -d, -f2 "$WORK/fourone/loss.csv" | tail -n +2) \
  <(cut -d, -f2 "$WORK/foura/loss.csv" | tail -n +2) |
  awk -F, '{ d = $1 - $2; if (d < 0) d = -d; if (d > 1e-5 * $1) { print "step " NR ": " $1 " vs " $2; bad = 1 } }
           END { exit bad }' || fail "accum 4: 2 ranks and 1 process differ beyond fp32 rounding"

# accum 3 cannot be split over 2 ranks: a clear error, and the job ends.
if "${MPIRUN[@]}" "$MAMBACPP" train "${MODEL[@]}" --steps 2 --batch 2 --accum 3 \
  --save "$WORK/bad" > "$WORK/bad.log" 2>&1; then
  fail "accum 3 on 2 ranks was accepted"
fi
grep -q "must be a multiple of the number of processes" "$WORK/bad.log" ||
  fail "no clear message for accum 3 on 2 ranks: $(cat "$WORK/bad.log")"
echo "OK: 2 ranks == 1 process bit for bit (accum 2), deterministic within 1e-5 (accum 4)"
