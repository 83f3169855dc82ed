#!/usr/bin/env bash
# On a GPU machine: builds the kernels (kernels-only mode, Release), runs the GPU tests, the Python
# binding test and the scan benchmark. Logs and the benchmark JSON go to $OUT (default
# /tmp/gpu-check). Extra benchmark flags: BENCH_ARGS="--runs 30".
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-gpu}
status=0

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv 2>&1 | tee "$OUT/gpu.txt"
if ! { cmake -S . -B "$BUILD" -G Ninja -DMAMBA_KERNELS_ONLY=ON -DCMAKE_BUILD_TYPE=Release &&
       ninja -C "$BUILD" -j16; } >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
grep -i "spill\|warning" "$OUT/build.log" | head -20

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  "$BUILD/test_selective_scan_cuda" --gtest_brief=1 2>&1 | tee "$OUT/gtest.log" || status=1
  "$BUILD/test_selective_scan_cpu" --gtest_brief=1 2>&1 | tail -3 || status=1
  MAMBA_KERNELS_LIB="$BUILD/libmamba_kernels.so" PYTHONUNBUFFERED=1 \
    python3 tests/gpu/test_mamba_kernels.py 2>&1 | tee "$OUT/pytest.log" || status=1
fi
if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  # shellcheck disable=SC2086
  "$BUILD/scan_bench" --json "$OUT/scan_bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" ||
    status=1
fi
exit $status
