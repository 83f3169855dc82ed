#!/usr/bin/env bash
# On a machine with several GPUs of one host (issues 17 and 18), with the bundle of
# scripts/gpu-bundle.sh carried as .gpu-bundle/: every multi-GPU run, for P = 2, 4, 8 up to the
# GPUs present (NCCL, NVLink multicast off). Logs, summaries and a table in $OUT, packed into
# $OUT/gpu-multi.tar.gz. RUNS picks parts: "equal dp weak longest" (all by default).
#   equal    test_distributed over NCCL at -np P: every layout's loss, gradients and parameters
#            against one rank, reruns bit-identical.
#   dp       Mamba-130M and 370M, seqlen 2048, batch 8 a GPU: tokens/s on 1..P GPUs with the
#            all-reduce bucketed and overlapped (gradBucketMb 25) and after the backward (0).
#   weak     Mamba-130M at batch 1, sp = P: 65,536 and 8,192 tokens a GPU against one GPU, the
#            state maps all-gathered and handed along a send/recv chain.
#   longest  the longest single sequence of 130M at sp = P (recompute LAYER): LONGEST="1048576
#            1146880" candidate lengths, the last that trains is the answer.
# A dry run of the script's plumbing on CPUs: NGPU=2 BACKEND=cpu DP_MODELS="tiny 32 2"
#   WEAK_MODEL="32 2" WEAK_LENS="256" LONGEST="512" (nvidia-smi absent is fine then).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-multi}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
RUNS=${RUNS:-equal dp weak longest}
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
BACKEND=${BACKEND:-cuda}
DP_MODELS=${DP_MODELS:-130m 768 24;370m 1024 48}
WEAK_MODEL=${WEAK_MODEL:-768 24}
WEAK_LENS=${WEAK_LENS:-65536 8192}
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=4
status=0
trap '(cd "$OUT" && tar -czf gpu-multi.tar.gz --exclude gpu-multi.tar.gz * 2>/dev/null &&
  find . -mindepth 1 ! -name gpu-multi.tar.gz -delete)' EXIT
[[ -d /tmp/bundle ]] || tar -xJf .gpu-bundle/bundle.tar.xz -C /tmp || exit 1
bin=/tmp/bundle/build
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/tmp/bundle/lib"
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE
  -x LD_LIBRARY_PATH -x OMP_NUM_THREADS -x MAMBA_TEST_TRANSPORT)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
sizes=()
for p in 2 4 8; do ((p <= NGPU)) && sizes+=("$p"); done
echo "GPUs: $NGPU; world sizes: ${sizes[*]}" | tee -a "$OUT/table.txt"

# Random tokens below the 130M vocabulary, enough for the longest runs.
python3 - <<'PY' || exit 1
import array, random
random.seed(1)
n = 1 << 24
tokens = array.array("H", (random.randrange(50280) for _ in range(n)))
with open("/tmp/tokens.bin", "wb") as f:
    tokens.tofile(f)
PY

# A job's rank-0 log and summary; prints the last window's tokens/s (warm-up excluded).
job() {  # name ranks json
  local name=$1 ranks=$2
  echo "$3" >"/tmp/$name.json"
  local cmd=("$bin/mamba-worker" --job "/tmp/$name.json" --summary_json "$OUT/$name.json")
  if ((ranks > 1)); then cmd=("${mpi[@]}" -np "$ranks" "${cmd[@]}"); fi
  timeout 900 "${cmd[@]}" >"$OUT/$name.log" 2>&1
  local rc=$?
  local tps
  tps=$(grep -oE '[0-9]+ tok/s' "$OUT/$name.log" | tail -1 | cut -d' ' -f1)
  echo "${tps:-0}"
  return $rc
}
spec() {  # d_model n_layer seq_len batch steps parallel recompute
  echo "{\"name\":\"m\",\"data\":{\"tokenFile\":{\"path\":\"/tmp/tokens.bin\",\"seqLen\":$3,
\"vocabSize\":50280,\"valFraction\":0.01}},\"model\":{\"dModel\":$1,\"nLayer\":$2},\"steps\":$5,
\"batchSize\":$4,\"logEvery\":$(($5 / 2)),\"backend\":\"$BACKEND\",
\"precision\":\"$([[ $BACKEND == cuda ]] && echo bf16 || echo fp32)\",
\"eval\":{\"batches\":0},\"parallel\":$6,\"memory\":{\"recompute\":\"$7\"}}"
}

if [[ " $RUNS " == *" equal "* ]]; then
  for p in "${sizes[@]}"; do
    MAMBA_TEST_TRANSPORT=nccl timeout 900 "${mpi[@]}" -np "$p" "$bin/test_distributed" \
      --gtest_brief=1 >"$OUT/test_distributed_np${p}_nccl.log" 2>&1 || status=1
    echo "test_distributed -np $p nccl: $(grep -E 'PASSED|FAILED' \
      "$OUT/test_distributed_np${p}_nccl.log" | tail -2 | tr '\n' ' ')" | tee -a "$OUT/table.txt"
  done
fi

if [[ " $RUNS " == *" dp "* ]]; then
  IFS=';' read -ra models <<<"$DP_MODELS"
  for model in "${models[@]}"; do
    read -r name d n <<<"$model"
    one=$(job "dp-$name-1" 1 "$(spec "$d" "$n" 2048 8 20 '{}' CONV_AND_DELTA)") || status=1
    echo "dp $name 1 GPU: $one tokens/s" | tee -a "$OUT/table.txt"
    for p in "${sizes[@]}"; do
      for bucket in 25 0; do
        tps=$(job "dp-$name-$p-b$bucket" "$p" "$(spec "$d" "$n" 2048 $((8 * p)) 20 \
          "{\"dp\":$p,\"gradBucketMb\":$bucket}" CONV_AND_DELTA)") || status=1
        echo "dp $name $p GPUs bucket $bucket MB: $tps tokens/s, efficiency" \
          "$(python3 -c "print(f'{100 * $tps / ($p * max($one, 1)):.1f} %')")" |
          tee -a "$OUT/table.txt"
      done
    done
  done
fi

if [[ " $RUNS " == *" weak "* ]]; then
  read -r wd wn <<<"$WEAK_MODEL"
  for per in $WEAK_LENS; do
    one=$(job "weak-$per-1" 1 "$(spec "$wd" "$wn" "$per" 1 10 '{}' CONV_AND_DELTA)") || status=1
    echo "weak $per tokens a GPU, 1 GPU: $one tokens/s" | tee -a "$OUT/table.txt"
    for p in "${sizes[@]}"; do
      # The state maps all-gathered (default) or handed along a send/recv chain.
      for exchange in ALL_GATHER CHAIN; do
        tps=$(job "weak-$per-$p-$exchange" "$p" "$(spec "$wd" "$wn" $((per * p)) 1 10 \
          "{\"sp\":$p,\"stateExchange\":\"$exchange\"}" CONV_AND_DELTA)") || status=1
        echo "weak $per tokens a GPU, sp $p, $exchange: $tps tokens/s, step time ratio" \
          "$(python3 -c "print(f'{$p * max($one, 1) / max($tps, 1):.3f}')")" |
          tee -a "$OUT/table.txt"
      done
    done
  done
fi

if [[ " $RUNS " == *" longest "* ]]; then
  p=${sizes[-1]}
  read -r wd wn <<<"$WEAK_MODEL"
  for len in ${LONGEST:-1048576 1146880}; do
    if tps=$(job "longest-$len-sp$p" "$p" "$(spec "$wd" "$wn" "$len" 1 3 "{\"sp\":$p}" LAYER)"); then
      echo "longest: $len tokens at sp $p trains: $tps tokens/s, rank 0 peak" \
        "$(python3 -c "import json; print(round(json.load(open('$OUT/longest-$len-sp$p.json'))\
['peak_memory_gib'], 2))") GiB" | tee -a "$OUT/table.txt"
    else
      echo "longest: $len tokens at sp $p does not train ($(grep -m1 -oE 'error: .{0,120}' \
        "$OUT/longest-$len-sp$p.log"))" | tee -a "$OUT/table.txt"
    fi
  done
fi
cat "$OUT/table.txt"
exit $status
