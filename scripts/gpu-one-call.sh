#!/usr/bin/env bash
# Every one-GPU check and benchmark in one device call, most important first, within a deadline
# (BUDGET seconds, default 560: a device call runs at most 600), for sessions that may get one
# machine once. Each part runs under the time left and packs its own results:
#   1. scripts/gpu-profile-check.sh without Nsight Compute: the CUDA ops' tests and the counters'
#      test, the selective-copying job, the 130M step against the pre-profiling commit;
#   2. scripts/gpu-distributed.sh without the longest-sequence search: the state maps, the
#      multi-rank tests (NCCL at one rank, MPI at two), the CUDA jobs at dp 2 / sp 2, the
#      2^20-token evaluation, sp_bench;
#   3. scripts/profile.sh: CUPTI's counters against Nsight Compute's.
# Output: $OUT/<part>.tar.gz (what the part wrote) and $OUT/<part>.log, six files at most (a device
# call returns eight); PARTS="check dist ncu" picks.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-one-call}
BUDGET=${BUDGET:-560}
cd "$(dirname "$0")/.."
start=$SECONDS
status=0
for part in ${PARTS:-check dist ncu}; do
  left=$((BUDGET - (SECONDS - start)))
  if ((left < 30)); then
    echo "== $part: not run (${left}s left)"
    continue
  fi
  case $part in
    check) cmd=(env OUT="$OUT/check" SKIP_PROFILE=1 bash scripts/gpu-profile-check.sh) ;;
    dist) cmd=(env OUT="$OUT/dist" SKIP_LONGEST=1 bash scripts/gpu-distributed.sh) ;;
    ncu) cmd=(env OUT="$OUT/ncu" bash scripts/profile.sh) ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
  mkdir -p "$OUT/$part"
  echo "== $part (up to ${left}s)"
  t0=$SECONDS
  timeout "$left" "${cmd[@]}" >"$OUT/$part.log" 2>&1
  rc=$?
  ((rc != 0)) && status=1
  echo "== $part: exit $rc after $((SECONDS - t0))s"
  # Test progress lines say nothing the summary does not.
  grep -vE '^\[ +(RUN|OK) +\]' "$OUT/$part.log" | tail -"${TAIL:-40}"
  (cd "$OUT" && tar -czf "$part.tar.gz" "$part" && rm -rf "$part")
done
exit $status
