#!/bin/bash
# Prefill / decode tokens/s, peak RSS and the decode bandwidth bound of one model shape at every
# weight dtype (f32, bf16, q8_0, q4_0), one process per dtype under /usr/bin/time -v, in one run
# (docs/PERFORMANCE.md, "Quantised weights"). Run it under the shared lock on a built tree:
#   flock /tmp/bench.lock scripts/bench-quant.sh [PRESET] [THREADS] [BANDWIDTH_GB_S]
# The bound: decode reads every weight once per token, so tok/s <= bandwidth / weight bytes
# (the recurrent states, ~1.5 MB at 130m, are left out). BANDWIDTH_GB_S defaults to 35.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${1:-mamba-130m}
T=${2:-2}
BW=${3:-35}
BIN=${MAMBACPP:-build/mambacpp}  # the binary (default: this tree's build)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| dtype | prefill 512 tok/s (min-max) | decode 128 tok/s (min-max) | weights MiB | bound tok/s | decode / bound | peak RSS MiB (time -v) |"
echo "|---|---|---|---|---|---|---|"
for dt in f32 bf16 q8_0 q4_0; do
  out=$(/usr/bin/time -v "$BIN" bench --preset "$P" --threads "$T" --dtype "$dt" --json 2>/tmp/bench-quant-time.$$)
  rss_kb=$(grep "Maximum resident set size" /tmp/bench-quant-time.$$ | awk '{print $NF}')
  /usr/bin/python3 - "$dt" "$out" "$rss_kb" "$BW" <<'PY'
import json, sys
dt, j, rss_kb, bw = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
p, d, w = j["prefill_tok_s"], j["decode_tok_s"], j["weight_mib"]
bound = bw * 1e9 / (w * 1048576)
print(f"| {dt} | {p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) | {d['median']:.1f} "
      f"({d['min']:.1f}-{d['max']:.1f}) | {w:.1f} | {bound:.0f} | {d['median'] / bound:.0%} | "
      f"{rss_kb / 1024:.1f} |")
PY
done
rm -f /tmp/bench-quant-time.$$
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
