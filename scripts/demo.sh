#!/usr/bin/env bash
# The main job. For now: a short induction-heads training run on the CPU (the paper's synthetic
# task, small enough for a laptop) by a local worker pool of DEMO_RANKS (default 2) mpirun ranks
# splitting each batch (data parallel, one thread a rank), printing progress and a held-out
# evaluation. DEMO_RANKS=1 trains in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
# Idle OpenMP threads sleep instead of spinning: much faster when the cores are shared.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
bash scripts/setup-deps.sh
if [[ ! -x build/mamba-worker ]] || [[ -n "$(find worker proto CMakeLists.txt -newer build/mamba-worker -print -quit)" ]]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build -j"$(nproc)" --target mamba-worker
fi
mkdir -p runs
ranks=${DEMO_RANKS:-2}
if ((ranks == 1)); then
  exec build/mamba-worker --job scripts/jobs/demo-induction-heads.json \
    --summary_json runs/demo-summary.json "$@"
fi
root_flag=()
if [[ $(id -u) -eq 0 ]]; then root_flag=(--allow-run-as-root); fi
exec mpirun -np "$ranks" --oversubscribe --bind-to none "${root_flag[@]}" \
  -x OMP_NUM_THREADS=1 -x OMP_WAIT_POLICY build/mamba-worker \
  --job scripts/jobs/demo-induction-heads.json --summary_json runs/demo-summary.json "$@"
