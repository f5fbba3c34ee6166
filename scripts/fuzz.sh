#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/fuzz_*.cpp; clang-14 + libfuzzer-14-dev, ASan+UBSan)
# in build-fuzz/ and runs each for SECONDS (default 60), one after the other, under nice -n 19.
#   scripts/fuzz.sh [SECONDS] [TARGET...]     e.g. scripts/fuzz.sh 600 torch_bin config
# Targets: safetensors torch_bin torch_pickle config npy tokenizer_json tokenizer_text gguf (default all),
# and chat_template (chat templates; needs cpp-httplib for the serve library; not in the default
# set, which CI runs: name it).
# Each target starts from the seeds in tests/fuzz/corpus/<target>/ (committed, small) plus what
# earlier runs kept in build-fuzz/corpus/<target>/, with the dictionary tests/fuzz/dict/*.dict
# that fits it. Limits: 1 s per input (-timeout), 1024 MiB per allocation (-malloc_limit_mb),
# 2048 MiB resident (-rss_limit_mb); leaks are reported (ASan). A crash, leak, timeout or
# over-cap allocation stops that target and leaves the input in build-fuzz/artifacts/<target>/;
# the script then exits 1. One summary line per target: executions, execs/s, coverage (cov =
# edges, ft = features), CPU seconds. Environment: FUZZ_JOBS (default 2) parallel build jobs,
# FUZZ_PARALLEL (default 1) targets run at once, FUZZ_BUILD (default build-fuzz) the build folder,
# FUZZ_TIMEOUT (default 1) the per-input limit in seconds, FUZZ_NICE (default 19) the fuzzers'
# niceness (not SIGSTOP: a stopped fuzzer's inputs "time out"). libFuzzer measures it in wall-clock
# time: on a loaded machine a niced fuzzer waits for the CPU for seconds, so an inside-the-limit
# input can "time out"; there raise FUZZ_TIMEOUT and re-run what is slow alone (each target's
# log has libFuzzer's slowest_unit_time_sec; fuzz_<target> <file> replays one input).
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
all=(safetensors torch_bin torch_pickle config npy tokenizer_json tokenizer_text gguf)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all[@]}")
build=${FUZZ_BUILD:-build-fuzz}

for tool in clang++-14 clang-14; do
  command -v $tool >/dev/null 2>&1 || { echo "fuzz.sh: $tool not found (apt-get install clang-14 libfuzzer-14-dev)" >&2; exit 2; }
done
launcher=()
command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
if [ ! -f "$build/CMakeCache.txt" ]; then
  CC=clang-14 cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-14 \
    "${launcher[@]}" -DMAMBA_FUZZ=ON -DMAMBA_BUILD_TESTS=OFF -DMAMBA_BUILD_BENCH=OFF \
    -DMAMBA_HWY_ONLY="$(grep -q '\bavx512f\b' /proc/cpuinfo 2>/dev/null && echo AVX3 || echo AVX2)" \
    >/dev/null || exit 2
fi
names=()
for t in "${targets[@]}"; do names+=("fuzz_$t"); done
cmake --build "$build" -j"${FUZZ_JOBS:-2}" --target "${names[@]}" || exit 2

dict_for() {
  case $1 in
    safetensors|config|tokenizer_json) echo tests/fuzz/dict/json.dict ;;
    torch_bin|torch_pickle) echo tests/fuzz/dict/torch_bin.dict ;;
    npy) echo tests/fuzz/dict/npy.dict ;;
    chat_template) echo tests/fuzz/dict/jinja.dict ;;
    *) echo "" ;;
  esac
}

mkdir -p "$build/logs"
run_one() {  # run_one TARGET: runs it, writes its summary line to $build/logs/TARGET.summary
  local t=$1
  local corpus="$build/corpus/$t" art="$build/artifacts/$t/" log="$build/logs/$t.log"
  mkdir -p "$corpus" "$art"
  local d
  d=$(dict_for "$t")
  local args=(-max_total_time="$secs" -timeout="${FUZZ_TIMEOUT:-1}" -malloc_limit_mb=1024 -rss_limit_mb=2048
              -print_final_stats=1 -artifact_prefix="$art")
  [ -n "$d" ] && args+=(-dict="$d")
  # CPU time of the fuzzer process (user + system), from bash's `time`.
  ( TIMEFORMAT='%U %S'; time nice -n "${FUZZ_NICE:-19}" "$build/fuzz_$t" "${args[@]}" "$corpus" \
      "tests/fuzz/corpus/$t" >"$log" 2>&1 ) 2>"$build/logs/$t.time"
  local rc=$?
  local cpu execs eps last cov ft res=ok
  cpu=$(awk '{printf "%.0f", $1 + $2}' "$build/logs/$t.time" 2>/dev/null)
  execs=$(grep 'stat::number_of_executed_units:' "$log" | awk '{print $2}')
  eps=$(grep 'stat::average_exec_per_sec:' "$log" | awk '{print $2}')
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(echo "$last" | grep -o 'cov: [0-9]*' | awk '{print $2}')
  ft=$(echo "$last" | grep -o 'ft: [0-9]*' | awk '{print $2}')
  # slow-unit-* files are inputs over libFuzzer's -report_slow_units (10 s of wall-clock time):
  # noted, not failures (replay them alone to see their real time).
  if [ "$rc" != 0 ] || ls "$art" | grep -v '^slow-unit-' | grep -q .; then
    res="FAILED (see $log, $art)"
  elif ls "$art" | grep -q '^slow-unit-'; then
    res="ok ($(ls "$art" | grep -c '^slow-unit-') slow-unit file(s) in $art: replay alone)"
  fi
  printf '%-15s %10s %9s %7s %7s %8s  %s\n' "$t" "${execs:-?}" "${eps:-?}" "${cov:-?}" \
    "${ft:-?}" "${cpu:-?}" "$res" >"$build/logs/$t.summary"
}

# FUZZ_PARALLEL targets at a time (default 1: the machine is shared; CI gives it its 2 cores).
par=${FUZZ_PARALLEL:-1}
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$par" ]; then wait -n; running=$((running - 1)); fi
  run_one "$t" &
  running=$((running + 1))
done
wait
failed=()
printf '%-15s %10s %9s %7s %7s %8s  %s\n' target execs execs/s cov ft cpu_s result
for t in "${targets[@]}"; do
  cat "$build/logs/$t.summary"
  grep -q FAILED "$build/logs/$t.summary" && failed+=("$t")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz.sh: no crash, leak, timeout or over-cap allocation in ${targets[*]} (${secs} s each)"
