#!/usr/bin/env bash
# The main job. For now: a short induction-heads training run on the CPU (the paper's synthetic
# task, small enough for a laptop), printing progress and a held-out evaluation.
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
exec build/mamba-worker --job scripts/jobs/demo-induction-heads.json \
  --summary_json runs/demo-summary.json "$@"
