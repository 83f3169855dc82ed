#!/usr/bin/env bash
# The real binaries end to end: mamba-coordinator on a free loopback port with a token and a
# SQLite file; mambactl submits (twice with one key), lists, cancels; the coordinator is stopped
# and started again on the same file, and the job is still there. Bounded: every step times out.
# Usage: cli_roundtrip.sh COORDINATOR MAMBACTL JOB.json
set -uo pipefail
coordinator=$1 ctl=$2 job=$3
work=$(mktemp -d)
pid=""
cleanup() {
  [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
echo "s3cret" >"$work/token"
start() {
  "$coordinator" --listen 127.0.0.1:0 --db "$work/jobs.db" --token_file "$work/token" \
    >"$work/coordinator.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    grep -q "listening on" "$work/coordinator.log" && break
    sleep 0.1
  done
  port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$work/coordinator.log")
  [[ -n $port ]] || { echo "FAIL: the coordinator did not start"; cat "$work/coordinator.log"; exit 1; }
}
ctl() { timeout 30 "$ctl" --coordinator "127.0.0.1:$port" --token_file "$work/token" "$@"; }
fail() { echo "FAIL: $*"; exit 1; }

start
out=$(ctl submit "$job" --key demo) || fail "submit"
echo "$out"
id=$(echo "$out" | awk '{print $NF}')
[[ $(ctl submit "$job" --key demo) == "already submitted $id" ]] || fail "idempotent submit"
# (Outputs are captured first: grep -q would end the pipe early, and pipefail would see it.)
out=$(timeout 30 "$ctl" --coordinator "127.0.0.1:$port" list 2>&1)
[[ $out == *UNAUTHENTICATED* ]] || fail "a call without the token was not refused: $out"
out=$(ctl list)
[[ $out =~ $id\ +QUEUED ]] || fail "list: $out"
kill "$pid"; wait "$pid"; pid=""
start  # the same file
out=$(ctl get "$id")
[[ $out =~ $id\ +QUEUED ]] || fail "the job did not survive a restart: $out"
out=$(ctl cancel "$id")
[[ $out == *CANCELLED* ]] || fail "cancel: $out"
out=$(ctl --json get "$id")
[[ $out == *'"state": "CANCELLED"'* ]] || fail "get --json: $out"
out=$(ctl cancel "$id" 2>&1)
[[ $out == *FAILED_PRECONDITION* ]] || fail "cancelling twice: $out"
echo "PASS"
