#!/usr/bin/env bash
# On a GPU machine, with the bundle of scripts/gpu-bundle.sh carried as .gpu-bundle/: the profiling
# report of a training step at train_bench's shapes, its counters collected twice and compared:
#   1. in process, CUPTI's range profiler (train_bench --report --count_ops), and
#   2. Nsight Compute, each op's kernels picked by the project's NVTX ranges
#      (--nvtx --nvtx-include "mamba@<op>/", --clock-control none), its raw CSV then turned into
#      the same report (train_bench --report --ncu_csv OP=FILE).
# Reports go to $OUT/cupti/ and $OUT/ncu/, ncu's CSVs beside them, the comparison to
# $OUT/compare.txt, all packed into $OUT/profile.tar.gz.
#   OPS="selective_scan_fwd selective_scan_bwd"
#   TRAIN_ARGS="--d_model 768 --n_layer 2 --batch 8 --seq_len 2048 --precision bf16"
set -uo pipefail
OUT=${OUT:-/tmp/profile}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
OPS=${OPS:-selective_scan_fwd selective_scan_bwd}
TRAIN_ARGS=${TRAIN_ARGS:---d_model 768 --n_layer 2 --batch 8 --seq_len 2048 --precision bf16}
METRICS=dram__bytes_read.sum,dram__bytes_write.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,gpu__time_duration.sum
status=0
trap '(cd "$OUT" && tar -czf profile.tar.gz --exclude profile.tar.gz * 2>/dev/null)' EXIT
[[ -d /tmp/bundle ]] || tar -xJf .gpu-bundle/bundle.tar.xz -C /tmp || exit 1
bench=(/tmp/bundle/run.sh /tmp/bundle/build/train_bench)
# shellcheck disable=SC2086
"${bench[@]}" $TRAIN_ARGS --steps 2 --warmup 1 --profile_steps 1 --report "$OUT/cupti" \
  --count_ops "${OPS// /,}" >"$OUT/cupti.log" 2>&1 || status=1
tail -25 "$OUT/cupti.log"
pairs=()
for op in $OPS; do
  # One step (no warm-up, no events): every kernel of that op in it, once.
  # shellcheck disable=SC2086
  /tmp/bundle/run.sh ncu --clock-control none --csv --page raw --print-units base \
    --metrics "$METRICS" --nvtx --nvtx-include "mamba@$op/" \
    "${bench[@]:1}" $TRAIN_ARGS --steps 1 --warmup 0 --profile_steps 0 >"$OUT/ncu-$op.csv" 2>&1 ||
    status=1
  pairs+=("$op=$OUT/ncu-$op.csv")
done
pairs_csv=$(IFS=,; echo "${pairs[*]}")
# shellcheck disable=SC2086
"${bench[@]}" $TRAIN_ARGS --steps 2 --warmup 1 --profile_steps 1 --report "$OUT/ncu" \
  --ncu_csv "$pairs_csv" >"$OUT/ncu.log" 2>&1 || status=1
tail -25 "$OUT/ncu.log"
# The two sources and the model, op by op (GB a step).
python3 - "$OUT" <<'PY' | tee "$OUT/compare.txt"
import json, sys
out = sys.argv[1]
def load(name):
    try:
        return {k["name"]: k for k in json.load(open(f"{out}/{name}/profile.json"))["kernels"]}
    except (OSError, ValueError):
        return {}
cupti, ncu = load("cupti"), load("ncu")
print(f"{'op':22} {'model GB':>9} {'CUPTI GB':>9} {'ncu GB':>9} {'CUPTI/model':>11} "
      f"{'shared GB CUPTI':>15} {'shared GB ncu':>13}")
for op in sorted(set(cupti) | set(ncu)):
    k = cupti.get(op) or ncu.get(op)
    model = (k["hbm_read_bytes"] + k["hbm_write_bytes"]) / 1e9
    def dram(src):
        m = src.get(op, {}).get("measured")
        return (m["dram_read_bytes"] + m["dram_write_bytes"]) / 1e9 if m else float("nan")
    def shared(src):
        m = src.get(op, {}).get("measured")
        return m["shared_bytes"] / 1e9 if m else float("nan")
    if any(src.get(op, {}).get("measured") for src in (cupti, ncu)):
        print(f"{op:22} {model:9.3f} {dram(cupti):9.3f} {dram(ncu):9.3f} "
              f"{dram(cupti) / model if model else float('nan'):11.3f} {shared(cupti):15.3f} "
              f"{shared(ncu):13.3f}")
PY
exit $status
