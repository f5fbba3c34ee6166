#!/usr/bin/env bash
# Under `mpirun -np 2`, a rank killed with SIGKILL mid-run ends the whole job (no hang: the test
# gives it 60 s), the checkpoint rank 0 left is complete, and `--resume` under mpirun continues to
# the uninterrupted run's final weights and moments bit for bit. The resumed run then resumes
# A rank that stops answering (SIGSTOP) makes its peer give up after --dist-timeout with a message
# naming the cause, and the job ends.
source "$(dirname "$0")/common.sh" "$@"
RUN=(--steps 40 --batch 4 --accum 2 --save-every 1)
"${MPIRUN[@]}" "$MAMBACPP" train "${MODEL[@]}" "${RUN[@]}" --save "$WORK/whole" > "$WORK/whole.log"

"${MPIRUN[@]}" "$MAMBACPP" train "${MODEL[@]}" "${RUN[@]}" --save "$WORK/killed" \
  > "$WORK/killed.log" 2>&1 &
launcher=$!
# Wait for the first committed checkpoint, then kill one rank (a child of the launcher).
for _ in $(seq 1 600); do
  [ -f "$WORK/killed/trainer_state.json" ] && break
  sleep 0.05
done
[ -f "$WORK/killed/trainer_state.json" ] || fail "no checkpoint after 30 s"
victim=$(pgrep -P "$launcher" -f "$MAMBACPP" | tail -n 1 || true)
[ -n "$victim" ] || fail "no rank process found under the launcher"
kill -KILL "$victim"
deadline=$((SECONDS + 60))
while kill -0 "$launcher" 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || { kill -KILL "$launcher"; fail "the job hung after a rank died"; }
  sleep 0.1
done
if wait "$launcher"; then fail "the job exited 0 although a rank was killed"; fi
step=$(sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$WORK/killed/trainer_state.json" | head -n 1)
[ -n "$step" ] && [ "$step" -lt 40 ] || fail "the kill came too late (step $step): nothing tested"

# Resume under mpirun for the remaining steps.
"${MPIRUN[@]}" "$MAMBACPP" train --resume "$WORK/killed" --threads 1 --eval-batches 0 \
  --bucket-mib 0.01 > "$WORK/resumed.log"
grep -q "resumed .* at step $step" "$WORK/resumed.log" || fail "did not resume at step $step"
for f in model.safetensors optimizer.safetensors; do
  cmp "$WORK/whole/$f" "$WORK/killed/$f" || fail "$f: killed + resumed != uninterrupted"
done
diff <(curve "$WORK/whole") <(curve "$WORK/killed") || fail "loss curves differ after resume"
grep -q "mpiexec noticed that process rank 1 .* exited on signal 9" "$WORK/killed.log" ||
  fail "no message about the killed rank: $(cat "$WORK/killed.log")"

# A rank that hangs: the other one waits --dist-timeout (2 s) in the gradient sum, then ends the job.
"${MPIRUN[@]}" "$MAMBACPP" train "${MODEL[@]}" --steps 100000 --batch 4 --accum 2 --dist-timeout 2 \
  --save "$WORK/hung" > "$WORK/hung.log" 2>&1 &
launcher=$!
for _ in $(seq 1 600); do
  grep -q "step      1/" "$WORK/hung.log" 2>/dev/null && break
  sleep 0.05
done
victim=$(pgrep -P "$launcher" -f "$MAMBACPP" | tail -n 1 || true)
[ -n "$victim" ] || fail "no rank process found under the launcher (hang test)"
kill -STOP "$victim"
deadline=$((SECONDS + 60))
while kill -0 "$launcher" 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || { kill -KILL "$victim" "$launcher"; fail "the job hung on a stopped rank"; }
  sleep 0.1
done
kill -KILL "$victim" 2>/dev/null || true
if wait "$launcher"; then fail "the job exited 0 although a rank hung"; fi
grep -q "waited more than 2 s for .*: a peer process died or hangs" "$WORK/hung.log" ||
  fail "no timeout message: $(cat "$WORK/hung.log")"
echo "OK: killed at step $step, the job ended; resumed under mpirun == uninterrupted, bit for bit; a stopped rank ends the job after the timeout"
