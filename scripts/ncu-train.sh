#!/usr/bin/env bash
# On a GPU machine, with the bundle from scripts/gpu-bundle.sh carried as .gpu-bundle/: profiles
# the training step's kernels with Nsight Compute (clocks left alone) in a 2-layer 130M-width
# model, one launch of each kernel matching KERNELS, and writes the report to $OUT/ncu-train.txt.
#   KERNELS='regex:ForwardKernel|BackwardKernel'   SECTIONS='--set full'   TRAIN_ARGS=...
set -uo pipefail
OUT=${OUT:-/tmp/ncu-train}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
tar -xJf .gpu-bundle/bundle.tar.xz -C /tmp || exit 1
# The first step's launches (cuBLAS heuristics, allocations) are warm-up: skip one layer's worth.
/tmp/bundle/run.sh ncu --clock-control none ${SECTIONS:---set full} --import-source no \
  --kernel-name "${KERNELS:-regex:ForwardKernel|BackwardKernel}" --launch-skip "${SKIP:-2}" \
  --launch-count "${COUNT:-4}" /tmp/bundle/build/train_bench --n_layer 2 --steps 1 --warmup 1 \
  --precision bf16 ${TRAIN_ARGS:-} >"$OUT/ncu-train.txt" 2>&1
grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Registers Per|Achieved Occupancy|Executed Instructions  " "$OUT/ncu-train.txt"
