#!/usr/bin/env bash
# On a GPU machine, from the bundle of scripts/gpu-bundle.sh: the distributed-training checks and
# benchmarks of one GPU. Ranks share the GPU over the MPI transport (NCCL refuses two ranks on
# one GPU); NCCL itself runs at world size 1 here (two-GPU runs: a machine with two GPUs).
#   - the scan's state-map ops against the CPU reference (test_cuda_backend)
#   - test_distributed: mpirun -np 1 over NCCL, mpirun -np 2 over MPI (every layout vs one rank)
#   - mamba-worker: one rank vs mpirun -np 2 at sp=2 and dp=2 on a CUDA job
#   - sp_bench (Mamba-130M, 65,536 tokens a rank, sp 1/2/4/8) and the longest single sequence
#     of Mamba-130M that trains on one GPU (train_bench --batch 1 --seq_len 0 --recompute layer)
# Logs and JSON go to $OUT (default /tmp/gpu-distributed), packed into gpu-distributed.tar.gz.
# SKIP_BENCH=1 runs the checks only; SKIP_LONGEST=1 skips the longest-sequence search.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-distributed}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=4
status=0
pack() {
  (cd "$OUT" && shopt -s nullglob && files=(*.log *.json *.txt) &&
    ((${#files[@]})) && tar -czf gpu-distributed.tar.gz --remove-files "${files[@]}")
}
trap pack EXIT
tar -xJf .gpu-bundle/bundle.tar.xz -C /tmp || exit 1
run=/tmp/bundle/run.sh bin=/tmp/bundle/build
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH
  -x OMP_NUM_THREADS -x MAMBA_TEST_TRANSPORT)
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/tmp/bundle/lib"
# NCCL where the image keeps it, if not on the loader's path: PyTorch's nvidia-nccl package.
if ldd "$bin/test_distributed" | grep -q "libnccl.*not found"; then
  nccl_dir=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(os.path.dirname(nvidia.nccl.__file__), "lib"))' 2>/dev/null)
  [[ -n $nccl_dir ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$nccl_dir"
fi
ldd "$bin/test_distributed" | grep -E "not found|nccl|mpi" | tee "$OUT/ldd.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

"$bin/test_cuda_backend" --gtest_brief=1 --gtest_filter='*SelectiveScan*' 2>&1 |
  tee "$OUT/test_cuda_backend_scan.log" || status=1
MAMBA_TEST_TRANSPORT=nccl "${mpi[@]}" -np 1 "$bin/test_distributed" --gtest_brief=1 2>&1 |
  tee "$OUT/test_distributed_np1_nccl.log" || status=1
MAMBA_TEST_TRANSPORT=mpi "${mpi[@]}" -np 2 "$bin/test_distributed" --gtest_brief=1 2>&1 |
  tee "$OUT/test_distributed_np2_mpi.log" || status=1

# One CUDA job three ways: one rank, dp=2 and sp=2 (two ranks sharing the GPU over MPI).
job='{"name":"induction-cuda","data":{"inductionHeads":{"seqLen":4096}},"model":{"dModel":64,
"nLayer":2},"steps":40,"batchSize":8,"logEvery":10,"backend":"cuda","precision":"bf16",
"eval":{"batches":2,"seqLens":[4096]}'
echo "$job}" >/tmp/job1.json
echo "$job,\"parallel\":{\"dp\":2}}" >/tmp/job-dp2.json
echo "$job,\"parallel\":{\"sp\":2}}" >/tmp/job-sp2.json
"$bin/mamba-worker" --job /tmp/job1.json --summary_json "$OUT/job1.json" 2>&1 |
  tee "$OUT/job1.log" || status=1
"${mpi[@]}" -np 2 "$bin/mamba-worker" --job /tmp/job-dp2.json --summary_json "$OUT/job-dp2.json" \
  2>&1 | tee "$OUT/job-dp2.log" || status=1
"${mpi[@]}" -np 2 "$bin/mamba-worker" --job /tmp/job-sp2.json --summary_json "$OUT/job-sp2.json" \
  2>&1 | tee "$OUT/job-sp2.log" || status=1

# Evaluation at 2^20 tokens of a tiny model: the chunked evaluation keeps the workspace small
# (it was 67 GiB when the evaluation ran as one pass).
echo '{"name":"induction-eval-1m","data":{"inductionHeads":{"seqLen":256}},"model":{"dModel":64,
"nLayer":2},"steps":200,"batchSize":8,"logEvery":50,"backend":"cuda","precision":"bf16",
"optimizer":{"lr":0.003},"eval":{"batches":1,"seqLens":[256,65536,1048576]}}' >/tmp/job-eval.json
"$bin/mamba-worker" --job /tmp/job-eval.json --summary_json "$OUT/job-eval.json" 2>&1 |
  tee "$OUT/job-eval.log" || status=1

if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  "$bin/sp_bench" --json "$OUT/sp_bench.json" ${SP_BENCH_ARGS:-} 2>&1 | tee "$OUT/sp_bench.log" ||
    status=1
  if [[ "${SKIP_LONGEST:-0}" != 1 ]]; then
    "$bin/train_bench" --batch 1 --seq_len 0 --recompute layer --precision bf16 --steps 3 \
      --warmup 1 --profile_steps 1 --json "$OUT/train_bench_longest.json" 2>&1 |
      tee "$OUT/train_bench_longest.log" || status=1
  fi
fi
exit $status
