#!/usr/bin/env bash
# A longer fuzzing run of every parser harness (tests/fuzz/), each SECONDS seconds (default 600) on
# a growing corpus kept in runs/fuzz/<name> (seeded from tests/fuzz/corpus/<name>). Findings
# (crash-*, leak-*, timeout-* files) land in runs/fuzz/. Needs clang (scripts/setup-deps.sh
# installs it). Usage: scripts/fuzz.sh [SECONDS] [NAME...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
shift || true
names=("$@")
((${#names[@]})) || names=(safetensors hf_config trainer_state job_spec token_file)
bash scripts/setup-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
targets=()
for n in "${names[@]}"; do targets+=("fuzz_${n}_target"); done
cmake --build build -j"$(nproc)" --target "${targets[@]}"
mkdir -p runs/fuzz
for n in "${names[@]}"; do
  mkdir -p "runs/fuzz/$n"
  cp -rn "tests/fuzz/corpus/$n/." "runs/fuzz/$n/"
  echo "== fuzz_$n for ${seconds}s"
  (cd runs/fuzz && "../../build/tests/fuzz/fuzz_$n" -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=4096 -print_final_stats=1 "$n")
done
