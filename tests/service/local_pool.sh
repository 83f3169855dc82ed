#!/usr/bin/env bash
# The coordinator's embedded pool (--local_workers): it trains a submitted job; killed (kill -9 of
# its mpirun), it is started again and trains the next job; the coordinator stops it on exit.
# Usage: local_pool.sh COORDINATOR MAMBACTL WORKER JOB.json
set -uo pipefail
coordinator=$1 ctl=$2 worker=$3 job=$4
work=$(mktemp -d)
cleanup() {
  [[ -n ${pid:-} ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; cat "$work/coordinator.log"; exit 1; }
"$coordinator" --listen 127.0.0.1:0 --db "$work/jobs.db" --checkpoint_root "$work/ckpt" \
  --local_workers 1 --worker "$worker" --heartbeat 200ms >"$work/coordinator.log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/coordinator.log" && break; sleep 0.1; done
address=$(sed -n 's/^listening on //p' "$work/coordinator.log")
[[ -n $address ]] || fail "the coordinator did not start"
ctl() { timeout 60 "$ctl" --coordinator "$address" "$@"; }
first=$(ctl submit "$job" | awk '{print $NF}')
ctl watch "$first" >/dev/null || fail "the local pool did not train $first"
echo "ok: the local pool trained $first"
pool=$(pgrep -f -- "mpirun.*--coordinator $address" | head -1)
[[ -n $pool ]] || fail "no local pool process"
kill -9 "$pool"
for _ in $(seq 200); do grep -q "restarting it" "$work/coordinator.log" && break; sleep 0.1; done
grep -q "restarting it" "$work/coordinator.log" || fail "the pool was not restarted"
second=$(ctl submit "$job" | awk '{print $NF}')
ctl watch "$second" >/dev/null || fail "the restarted pool did not train $second"
echo "ok: killed, restarted, and it trained $second"
kill "$pid"
for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "the coordinator did not stop"
wait "$pid"
pid=""
# (The ranks of the mpirun killed above exit on their own once they lose it; give them time.)
for _ in $(seq 150); do pgrep -f -- "--coordinator $address" >/dev/null || break; sleep 0.1; done
pgrep -fa -- "--coordinator $address" && fail "the local pool outlived the coordinator"
echo "PASS"
