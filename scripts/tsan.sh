#!/usr/bin/env bash
# ThreadSanitizer run of the thread-safety tests (issue 18 item 7; docs/RELIABILITY.md section 7):
# builds test_thread_safety and test_block with clang-14 -fsanitize=thread in build-tsan/ and runs
# them. Any data race reported fails the run (halt_on_error).
#   scripts/tsan.sh            (environment: TSAN_BUILD folder, TSAN_JOBS build jobs, default 2)
#
# OpenMP under TSan: the library's kernels use OpenMP, and an OpenMP runtime that is not built with
# TSan synchronises its worker threads in ways TSan cannot see (every barrier would be reported as
# a race). clang builds against LLVM's libomp (-fopenmp=libomp, from libomp-14-dev), which ships
# Archer (libarcher.so), the OMPT tool that tells TSan about libomp's barriers, tasks and locks:
# OMP_TOOL_LIBRARIES loads it, so the OpenMP regions run with 2 threads, as in use, inside each
# of the test's own std::threads. OpenBLAS (not instrumented, and built on libgomp) runs with
# one thread (OPENBLAS_NUM_THREADS=1), and TSan ignores what happens inside modules that are not
# instrumented (ignore_noninstrumented_modules=1); the accesses of our own code stay checked.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${TSAN_BUILD:-build-tsan}
archer=/usr/lib/llvm-14/lib/libarcher.so
for f in /usr/bin/clang++-14 "$archer"; do
  [ -e "$f" ] || { echo "tsan.sh: $f not found (apt-get install clang-14 libomp-14-dev)" >&2; exit 2; }
done
launcher=()
command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
hwy=AVX2  # the Highway target to keep (MAMBA_HWY_ONLY): the best this machine runs
grep -q '\bavx512f\b' /proc/cpuinfo 2>/dev/null && hwy=AVX3
CC=clang-14 cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-14 \
  "${launcher[@]}" -DMAMBA_SANITIZE=thread -DMAMBA_HWY_ONLY="$hwy" -DMAMBA_BUILD_TESTS=ON \
  -DMAMBA_BUILD_BENCH=OFF -DMAMBA_PYTHON=OFF >/dev/null
cmake --build "$build" -j"${TSAN_JOBS:-2}" --target test_thread_safety test_block
export OMP_TOOL_LIBRARIES=$archer OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1
export TSAN_OPTIONS="halt_on_error=1 ignore_noninstrumented_modules=1 second_deadlock_stack=1"
rc=0
for t in test_thread_safety test_block; do
  echo "tsan.sh: $build/$t (ThreadSanitizer, Archer for OpenMP)"
  "$build/$t" --gtest_brief=1 || rc=1
done
exit $rc
