#!/usr/bin/env bash
# On a GPU machine: builds the kernels (kernels-only, Release) and profiles the scan kernels of one
# scan_bench row with Nsight Compute (full section set, clocks left alone), writing a text report
# per kernel and the SASS of the scan kernels to $OUT, packed into $OUT/ncu-scan.tar.gz.
#   ROWS=1 (scan_bench row, 0-based: 0 = (8,1536,2048) fp32, 1 = the same in bf16, ...)
#   KERNELS='TiledScanKernel|TiledBackwardKernel' (regex)   NCU_ARGS=extra ncu flags
#   BENCH_ARGS=extra scan_bench flags (e.g. "--fwd-lanes 8")
set -uo pipefail
OUT=${OUT:-/tmp/ncu-scan}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-gpu}
trap '(cd "$OUT" && tar -czf ncu-scan.tar.gz --remove-files ./*.txt ./*.log 2>/dev/null)' EXIT

if ! { cmake -S . -B "$BUILD" -G Ninja -DMAMBA_KERNELS_ONLY=ON -DCMAKE_BUILD_TYPE=Release &&
       ninja -C "$BUILD" -j16 scan_bench; } >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
cuobjdump -sass "$BUILD/scan_bench" >"$OUT/scan_bench.sass.txt" 2>&1 || true

for row in ${ROWS:-1}; do
  # 3 warm-ups + 1 timed run each for forward and backward: profile the last launch of each kernel.
  ncu --clock-control none --set full --import-source no \
    --kernel-name "regex:${KERNELS:-TiledScanKernel|TiledBackwardKernel}" \
    --launch-skip 3 --launch-count 3 ${NCU_ARGS:-} \
    "$BUILD/scan_bench" --rows "$row" --runs 1 ${BENCH_ARGS:-} >"$OUT/ncu_row$row.txt" 2>&1
  tail -5 "$OUT/ncu_row$row.txt"
done
