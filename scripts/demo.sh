#!/usr/bin/env bash
# The main job, as the whole service on this machine: a coordinator (gRPC, SQLite job store) with
# a local worker pool of DEMO_RANKS (default 2) mpirun ranks, and a job submitted with mambactl: a
# short induction-heads run (the paper's synthetic task, small enough for a laptop; on the GPU
# where there is one), data parallel over the ranks, followed live (mambactl watch: state changes,
# step, loss, tokens/s, ETA, the held-out evaluation), then listed with its checkpoints. Everything
# stops at the end, also on Ctrl-C. Files go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
# Idle OpenMP threads sleep instead of spinning: much faster when the cores are shared.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
bash scripts/setup-deps.sh
targets=(mamba-worker mamba-coordinator mambactl)
if [[ -n "$(find worker coordinator proto checkpoints CMakeLists.txt -newer build/mambactl -print -quit 2>/dev/null)" ]] ||
  [[ ! -x build/mambactl ]]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build -j"$(nproc)" --target "${targets[@]}"
fi
rm -rf runs/demo && mkdir -p runs/demo
build/mamba-coordinator --listen 127.0.0.1:0 --db runs/demo/coordinator.db \
  --checkpoint_root runs/demo/checkpoints --local_workers "${DEMO_RANKS:-2}" \
  >runs/demo/coordinator.log 2>&1 &
coordinator=$!
trap 'kill $coordinator 2>/dev/null; wait $coordinator 2>/dev/null' EXIT
for _ in $(seq 100); do grep -q "listening on" runs/demo/coordinator.log && break; sleep 0.1; done
address=$(sed -n 's/^listening on //p' runs/demo/coordinator.log)
[[ -n $address ]] || { cat runs/demo/coordinator.log; exit 1; }
echo "coordinator: $address (job store runs/demo/coordinator.db; pool log runs/demo/coordinator.log)"
ctl() { build/mambactl --coordinator "$address" "$@"; }
spec=scripts/jobs/demo-induction-heads.json
# With a GPU (and a CUDA build), the same job on it.
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 &&
  grep -q "MAMBA_CUDA:BOOL=ON" build/CMakeCache.txt; then
  sed 's/"seed": 1234,/"seed": 1234, "backend": "cuda",/' "$spec" >runs/demo/job.json
  spec=runs/demo/job.json
fi
job=$(ctl submit "$spec" --key demo | awk '{print $NF}')
echo "submitted $job; following it:"
status=0
ctl watch "$job" || status=$?
echo
ctl list
echo "checkpoints:"
ctl checkpoints "$job"
echo "profile (the slowest ops; all of it in runs/demo/profile.md, .json, .svg):"
ctl profile "$job" --save runs/demo 2>/dev/null | sed -n '7,14p' || true
exit $status
