#!/usr/bin/env bash
# A rank that dies (kill -9) or hangs (SIGSTOP) mid-job ends the whole job within a bounded time,
# with the rank named. Usage: rank_failure.sh MPIRUN_ARGS... -- WORKER (kill|stop)
set -uo pipefail
mpirun_args=()
while [[ $1 != -- ]]; do mpirun_args+=("$1"); shift; done
shift
worker=$1 mode=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/job.json" <<'JSON'
{"data": {"inductionHeads": {"seqLen": 64}}, "model": {"dModel": 16, "nLayer": 2},
 "steps": 1000000, "batchSize": 4, "logEvery": 1, "eval": {"batches": 0}}
JSON
"${mpirun_args[@]}" -np 2 "$worker" --job "$work/job.json" --comm_timeout 5s \
  >"$work/out.log" 2>&1 &
launcher=$!
# Wait for training to be under way.
for _ in $(seq 300); do
  grep -q "^step" "$work/out.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "^step" "$work/out.log" || { echo "the job did not start"; cat "$work/out.log"; exit 1; }
# World rank 1's process, found by its launcher-given rank.
victim=""
for pid in $(pgrep -f -- "--job $work/job.json"); do
  # (No pipe into grep -q: under pipefail its early exit could fail the pipeline.)
  if grep -qx "OMPI_COMM_WORLD_RANK=1" < <(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null); then
    victim=$pid
  fi
done
[[ -n $victim ]] || { echo "rank 1 not found"; exit 1; }
start=$(date +%s)
signal=KILL
[[ $mode == kill ]] || signal=STOP
kill -s "$signal" "$victim"
# The job must end by itself within the bound (the 5 s exchange timeout plus teardown).
for _ in $(seq 600); do
  kill -0 "$launcher" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$launcher" 2>/dev/null; then
  echo "FAIL: the job still runs 60 s after rank 1 got SIG$signal"
  kill -9 "$victim" 2>/dev/null
  kill -9 "$launcher" 2>/dev/null
  exit 1
fi
wait "$launcher"
rc=$?
elapsed=$(($(date +%s) - start))
tail -n 25 "$work/out.log"
echo "job ended with status $rc, ${elapsed} s after rank 1 got SIG$signal"
[[ $rc -ne 0 ]] || { echo "FAIL: the job reported success"; exit 1; }
if [[ $mode == kill ]]; then
  grep -Eq "rank 1 .*exited on signal 9|rank 0: .*(waiting for rank 1|failed)" "$work/out.log" ||
    { echo "FAIL: rank 1 is not named"; exit 1; }
else
  grep -q "rank 0: .*made no progress for 5s waiting for rank 1" "$work/out.log" ||
    { echo "FAIL: no timeout naming rank 1"; exit 1; }
fi
echo "PASS"
