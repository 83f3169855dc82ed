#!/usr/bin/env bash
# On a GPU machine, with the bundle of scripts/gpu-bundle.sh carried as .gpu-bundle/: the profiling
# work's GPU checks, logs and reports packed into $OUT/gpu-profile.tar.gz.
#   1. the counters' test (a conversion's DRAM bytes) and the CUDA backend tests of the ops it
#      changed (embedding, norms, the scan's state maps);
#   2. scripts/profile.sh: the counters in process (CUPTI) and by Nsight Compute, side by side;
#   3. the selective-copying job (scripts/jobs/selective-copying.json) through its real loop, then
#      the bare step at its shapes (train_bench --job), with its profile report;
#   4. profiling off costs nothing: train_bench's Mamba-130M step against the commit before the
#      profiling work (.gpu-bundle/baseline/train_bench.xz, built by the caller), interleaved.
# SKIP_PROFILE=1, SKIP_JOB=1, SKIP_BASELINE=1 leave parts out.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-profile}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
repo=$PWD
status=0
trap '(cd "$OUT" && tar -czf gpu-profile.tar.gz --exclude gpu-profile.tar.gz * 2>/dev/null &&
  find . -mindepth 1 ! -name gpu-profile.tar.gz -delete)' EXIT
tar -xJf .gpu-bundle/bundle.tar.xz -C /tmp || exit 1
run=/tmp/bundle/run.sh bin=/tmp/bundle/build
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

"$run" "$bin/test_cuda_counters" 2>&1 | tee "$OUT/test_cuda_counters.log" | tail -12 || status=1
"$run" "$bin/test_cuda_backend" --gtest_brief=1 \
  --gtest_filter='*Embedding*:*AddRmsNorm*:*SelectiveScan*' 2>&1 | tee "$OUT/test_cuda_backend.log" |
  tail -5 || status=1

if [[ "${SKIP_PROFILE:-0}" != 1 ]]; then
  OUT="$OUT/profile" bash scripts/profile.sh || status=1
fi

if [[ "${SKIP_JOB:-0}" != 1 ]]; then
  (cd "$OUT" && "$run" "$bin/train_bench" --job "$repo/scripts/jobs/selective-copying.json" \
    --steps 20 --json "$OUT/selcopy.json" >"$OUT/selcopy.log" 2>&1) || status=1
  grep -E "step +[0-9]+/|done:|profile:|job loop|median step" "$OUT/selcopy.log"
  cat "$OUT"/profile-selective-copying/profile.md 2>/dev/null | head -40
fi

if [[ "${SKIP_BASELINE:-0}" != 1 && -f .gpu-bundle/baseline/train_bench.xz ]]; then
  xz -dc .gpu-bundle/baseline/train_bench.xz >/tmp/train_bench_baseline &&
    chmod +x /tmp/train_bench_baseline
  for round in 1 2; do
    for which in baseline current; do
      b=$bin/train_bench
      [[ $which == baseline ]] && b=/tmp/train_bench_baseline
      "$run" "$b" --precision bf16 --steps 10 --warmup 3 --profile_steps 1 \
        --json "$OUT/130m-$which-$round.json" >"$OUT/130m-$which-$round.log" 2>&1 || status=1
      echo "$which round $round: $(grep -E '^batch' "$OUT/130m-$which-$round.log")"
    done
  done
fi
exit $status
