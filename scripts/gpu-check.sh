#!/usr/bin/env bash
# On a GPU machine: builds the kernels (kernels-only mode, Release), runs the GPU tests, the Python
# binding test and the scan benchmark. Logs and the benchmark JSON go to $OUT (default
# /tmp/gpu-check), packed at the end into one archive, $OUT/gpu-check.tar.gz (PACK=0 keeps the
# files loose). Extra benchmark flags: BENCH_ARGS="--runs 30".
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-gpu}
status=0
pack() {
  if [[ "${PACK:-1}" == 1 ]]; then
    (cd "$OUT" && shopt -s nullglob && files=(*.log *.json *.txt) &&
      ((${#files[@]})) && tar -czf gpu-check.tar.gz --remove-files "${files[@]}")
  fi
}
trap pack EXIT

# The full build (model, trainer, train_bench), made on a Debian machine by scripts/gpu-bundle.sh
# and carried as .gpu-bundle/: the CUDA backend and model tests against the CPU backend, then the
# training benchmark (Mamba-130M at batch 8, seqlen 2048; 370M-size; with MAX_BATCH=1 also 130M at
# the largest batch that fits). BUNDLE_ONLY=1 skips the rest.
run_bundle() {
  tar -xJf .gpu-bundle/bundle.tar.xz -C /tmp || return 1
  local run=/tmp/bundle/run.sh bin=/tmp/bundle/build
  local t
  for t in "$bin"/test_cuda_*; do
    "$run" "$t" --gtest_brief=1 2>&1 | tee "$OUT/$(basename "$t").log" || status=1
  done
  if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
    "$run" "$bin/train_bench" --json "$OUT/train_bench_130m.json" ${TRAIN_BENCH_ARGS:-} 2>&1 |
      tee "$OUT/train_bench_130m.log" || status=1
    "$run" "$bin/train_bench" --d_model 1024 --n_layer 48 --steps 5 \
      --json "$OUT/train_bench_370m.json" ${TRAIN_BENCH_ARGS:-} 2>&1 |
      tee "$OUT/train_bench_370m.log" || status=1
    if [[ "${MAX_BATCH:-0}" == 1 ]]; then  # 130M at the largest batch that fits
      "$run" "$bin/train_bench" --batch 0 --steps 5 --json "$OUT/train_bench_130m_max.json" \
        ${TRAIN_BENCH_ARGS:-} 2>&1 | tee "$OUT/train_bench_130m_max.log" || status=1
    fi
  fi
}
if [[ -f .gpu-bundle/bundle.tar.xz ]]; then
  run_bundle || status=1
  if [[ "${BUNDLE_ONLY:-0}" == 1 ]]; then exit $status; fi
fi

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
  # The test shapes are small enough that the forward takes one channel a thread; once more with
  # two, the variant the large rows take.
  MAMBA_SCAN_FWD_CHANS=2 "$BUILD/test_selective_scan_cuda" --gtest_brief=1 2>&1 |
    tee "$OUT/gtest-chans2.log" || status=1
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
