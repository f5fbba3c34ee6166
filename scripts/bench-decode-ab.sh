#!/bin/bash
# Single-sequence decode tok/s of two mambacpp binaries (OLD, NEW), alternating run by run, at every
# weight type, against the decode bandwidth bound (docs/PERFORMANCE.md, "Decode: one thread team
# per token"). Each run is one `bench --json` process (prompt 16, 128 decoded tokens, 3 reps after
# a warm-up, the median) taken under the shared lock, so other benchmarks interleave between runs.
#   scripts/bench-decode-ab.sh OLD NEW [ROUNDS] [PRESETS] [TYPES]
# e.g. scripts/bench-decode-ab.sh /tmp/old/mambacpp build/mambacpp 2 "mamba-130m mamba2-130m"
# The bound: the read bandwidth measured by NEW's `info --measure` (at the start and the end; the
# larger is used) over the bytes a step reads: every weight at its storage type + 2 x the state
# (bench --json's decode_weight_bytes and state_bytes, MambaLM::token_cost).
set -euo pipefail
if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
OLD=$1
NEW=$2
ROUNDS=${3:-2}
PRESETS=${4:-"mamba-130m mamba2-130m"}
TYPES=${5:-"f32 f16 bf16 q8_0 q4_0"}
LOCK=${BENCH_LOCK:-/tmp/bench.lock}
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
bw() { flock "$LOCK" "$NEW" info --measure --json | /usr/bin/python3 -c \
  'import json,sys; d=json.load(sys.stdin); print(d["read_gbs"])'; }
BW0=$(bw)
for r in $(seq "$ROUNDS"); do
  for p in $PRESETS; do
    for t in $TYPES; do
      for v in old new; do
        bin=$OLD
        [[ $v == new ]] && bin=$NEW
        flock "$LOCK" "$bin" bench --preset "$p" --dtype "$t" --prompt 16 --gen 128 --reps 3 --json |
          /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps(
              {"v": sys.argv[1], "p": sys.argv[2], "t": sys.argv[3],
               "tok_s": d["decode_tok_s"]["median"],
               "bytes": d["decode_weight_bytes"] + 2 * d["state_bytes"]}))' "$v" "$p" "$t" >>"$OUT"
      done
    done
  done
  echo "round $r done, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
done
BW1=$(bw)
/usr/bin/python3 - "$OUT" "$BW0" "$BW1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bw = max(float(sys.argv[2]), float(sys.argv[3]))
print(f"read bandwidth: {sys.argv[2]} GB/s at the start, {sys.argv[3]} at the end; bound uses {bw}")
print("| model | type | old tok/s (rounds) | new tok/s (rounds) | new / old | bound tok/s | old % | new % |")
print("|---|---|---|---|---|---|---|---|")
keys = []
for r in rows:
    if (r["p"], r["t"]) not in keys:
        keys.append((r["p"], r["t"]))
for p, t in keys:
    o = [r["tok_s"] for r in rows if r["p"] == p and r["t"] == t and r["v"] == "old"]
    n = [r["tok_s"] for r in rows if r["p"] == p and r["t"] == t and r["v"] == "new"]
    nbytes = [r["bytes"] for r in rows if r["p"] == p and r["t"] == t][0]
    bound = bw * 1e9 / nbytes
    mo, mn = statistics.median(o), statistics.median(n)
    fmt = lambda v: "/".join(f"{x:.1f}" for x in v)
    print(f"| {p} | {t} | {mo:.1f} ({fmt(o)}) | {mn:.1f} ({fmt(n)}) | {mn / mo:.2f} | {bound:.0f} |"
          f" {100 * mo / bound:.0f}% | {100 * mn / bound:.0f}% |")
PY
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
