#!/usr/bin/env bash
# The whole service on loopback: mamba-coordinator, and real `mpirun -np 2` worker pools in
# service mode, driven by mambactl. A job runs to SUCCEEDED; a running job is cancelled (it stops
# at a step, checkpoints, ends CANCELLED); a job whose data cannot be read FAILS at once with the
# reason; a job no pool fits stays QUEUED; a pool killed with kill -9 mid-job loses its lease, the
# job goes RECOVERING and resumes from its last checkpoint on a new pool, to SUCCEEDED; a job
# with no restarts left FAILS listing every attempt; a coordinator restarted while a job runs
# finds its pool again (it registers anew, naming the job) and the job ends SUCCEEDED. Every wait
# is bounded. Usage: pool_e2e.sh COORDINATOR MAMBACTL WORKER LOGITS MPIRUN_ARGS...
set -uo pipefail
coordinator=$1 ctl=$2 worker=$3 logits=$4
shift 4
mpirun_args=("$@")
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  pkill -9 -f -- "--coordinator 127.0.0.1:$port" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  echo "--- coordinator"; cat "$work/coordinator.log"
  for f in "$work"/pool*.log; do echo "--- $f"; tail -20 "$f"; done
  exit 1
}
cd "$work"
start_coordinator() {  # [port]
  "$coordinator" --listen "127.0.0.1:${1:-0}" --db jobs.db --lease 3s --heartbeat 200ms \
    --checkpoint_root ckpt >>coordinator.log 2>&1 &
  coordinator_pid=$!
  pids+=($coordinator_pid)
  for _ in $(seq 100); do grep -q "listening on" coordinator.log && break; sleep 0.1; done
  port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' coordinator.log | tail -1)
  [[ -n $port ]] || fail "the coordinator did not start"
}
start_coordinator
ctl() { timeout 30 "$ctl" --coordinator "127.0.0.1:$port" "$@"; }
pool() {
  "${mpirun_args[@]}" -np 2 "$worker" --coordinator "127.0.0.1:$port" --comm_timeout 20s \
    >"pool$1.log" 2>&1 &
  pids+=($!)
  pool_pid=$!
}
# Waits (bounded) until job $1 is in state $2.
wait_state() {
  for _ in $(seq 600); do
    out=$(ctl get "$1" 2>&1)
    [[ $out =~ $1\ +$2 ]] && return 0
    sleep 0.1
  done
  fail "job $1 never reached $2: $out"
}
spec() {  # name steps [extra JSON fields] [data source]
  local data=${4:-'{"inductionHeads":{"seqLen":32}}'}
  echo "{\"name\":\"$1\",\"data\":$data,\"model\":{\"dModel\":16,\"nLayer\":1},
\"steps\":$2,\"batchSize\":4,\"logEvery\":50,\"eval\":{\"batches\":0}${3:-}}"
}

pool 1
spec short 20 >short.json
short=$(ctl submit short.json | awk '{print $NF}')
wait_state "$short" SUCCEEDED
[[ -d ckpt/$short/step_00000020 ]] || fail "no final checkpoint for $short"
"$logits" --random_tokens 2,16 --seed 1 --vocab 16 --tokens tokens.safetensors >/dev/null &&
  "$logits" --checkpoint "ckpt/$short/step_00000020" --tokens tokens.safetensors \
    --out logits.safetensors >/dev/null || fail "the job's checkpoint does not load"
out=$(ctl checkpoints "$short")
[[ $out == *"ckpt/$short/step_00000020"* ]] || fail "checkpoints: $out"
out=$(ctl watch "$short") || fail "watch of a job that succeeded: $out"
[[ $out == *"[0] QUEUED: submitted"* && $out == *"step 20/20"* && $out == *"SUCCEEDED: 20 steps"* ]] ||
  fail "watch: $out"
echo "ok: $short SUCCEEDED; its checkpoints and its events (mambactl watch) are there"

spec profiled 12 ',"profile":{}' >profiled.json
profiled=$(ctl submit profiled.json | awk '{print $NF}')
wait_state "$profiled" SUCCEEDED
mkdir -p fetched
out=$(ctl profile "$profiled" --save fetched 2>&1) || fail "profile: $out"
[[ $out == *"| selective_scan_fwd |"* && -s fetched/profile.json && -s fetched/profile.svg ]] ||
  fail "no report: $out"
echo "ok: $profiled's profile (tables printed, files saved) through mambactl profile"

spec long 1000000 >long.json
long=$(ctl submit long.json | awk '{print $NF}')
wait_state "$long" RUNNING
ctl cancel "$long" >/dev/null || fail "cancel"
wait_state "$long" CANCELLED
ls -d ckpt/"$long"/step_* >/dev/null 2>&1 || fail "$long stopped without a checkpoint"
echo "ok: $long CANCELLED at a step, with a checkpoint"

spec missing 10 '' '{"textFile":{"path":"/nonexistent/corpus.txt"}}' >missing.json
missing=$(ctl submit missing.json | awk '{print $NF}')
wait_state "$missing" FAILED
out=$(ctl get "$missing")
[[ $out == *"/nonexistent/corpus.txt"* ]] || fail "the failure does not say why: $out"
echo "ok: $missing FAILED at once: its data cannot be read"

spec wide 10 ',"parallel":{"sp":3}' >wide.json
wide=$(ctl submit wide.json | awk '{print $NF}')

spec recover 4000 ',"checkpoint":{"everySteps":200}' >recover.json
recover=$(ctl submit recover.json | awk '{print $NF}')
wait_state "$recover" RUNNING
for _ in $(seq 300); do
  ls -d ckpt/"$recover"/step_* >/dev/null 2>&1 && break
  sleep 0.1
done
ls -d ckpt/"$recover"/step_* >/dev/null 2>&1 || fail "no checkpoint to recover from"
# kill -9 one worker rank (rank 1): mpirun ends the pool, whose lease then expires.
victim=""
for p in $(pgrep -f -- "$worker --coordinator 127.0.0.1:$port"); do
  grep -qx "OMPI_COMM_WORLD_RANK=1" < <(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null) && victim=$p
done
[[ -n $victim ]] || fail "rank 1 of the pool not found"
kill -9 "$victim"
wait_state "$recover" RECOVERING
pkill -9 -f -- "--coordinator 127.0.0.1:$port" 2>/dev/null
echo "ok: $recover RECOVERING after a rank of its pool was killed (-9)"
pool 2
wait_state "$recover" SUCCEEDED
grep -q "resumed from ckpt/$recover/step_" pool2.log || fail "$recover did not resume"
# The same job uninterrupted ends with the same bits.
reference=$(ctl submit recover.json | awk '{print $NF}')
wait_state "$reference" SUCCEEDED
cmp -s "ckpt/$recover/step_00004000/model.safetensors" \
  "ckpt/$reference/step_00004000/model.safetensors" ||
  fail "the recovered job's parameters differ from an uninterrupted run's"
echo "ok: $recover resumed from its checkpoint on a new pool and SUCCEEDED, bit-identical to $reference"
out=$(ctl get "$wide")
[[ $out =~ $wide\ +QUEUED ]] || fail "a job no pool fits left the queue: $out"
[[ $out == *"waiting for a cpu pool of a multiple of 3 ranks (sp 3)"* ]] ||
  fail "the queued job does not say what it waits for: $out"
echo "ok: $wide (sp 3) waits in the queue for a pool that fits, and says so"

spec once 1000000 ',"maxRestarts":0' >once.json
once=$(ctl submit once.json | awk '{print $NF}')
wait_state "$once" RUNNING
kill -9 "$pool_pid"
pkill -9 -f -- "--coordinator 127.0.0.1:$port" 2>/dev/null
wait_state "$once" FAILED
out=$(ctl get "$once")
[[ $out == *"out of restarts (0 of 0); attempts: pool"*"lost"* ]] || fail "no attempts listed: $out"
echo "ok: $once FAILED when its pool was lost with no restarts left, naming the attempt"

pool 3
spec survive 600 ',"checkpoint":{"everySteps":100}' >survive.json
survive=$(ctl submit survive.json | awk '{print $NF}')
wait_state "$survive" RUNNING
kill -9 "$coordinator_pid"
wait "$coordinator_pid" 2>/dev/null
sleep 1
start_coordinator "$port"
wait_state "$survive" SUCCEEDED
out=$(sqlite3 jobs.db "select count(*) from events where job_id='$survive' and text like 'SUCCEEDED:%'")
[[ $out == 1 ]] || fail "$survive completed $out times"
echo "ok: $survive ran on while the coordinator was killed (-9) and restarted, and SUCCEEDED once"

# A pool that stops heartbeating (SIGSTOP) loses its job to another pool.
kill -9 "$pool_pid"
pkill -9 -f -- "--coordinator 127.0.0.1:$port" 2>/dev/null
pool 4
stopped_pool=$pool_pid
spec stall 3000 ',"checkpoint":{"everySteps":200}' >stall.json
stall=$(ctl submit stall.json | awk '{print $NF}')
wait_state "$stall" RUNNING
for p in $(pgrep -f -- "--coordinator 127.0.0.1:$port"); do kill -STOP "$p"; done
wait_state "$stall" RECOVERING
pool 5
wait_state "$stall" SUCCEEDED
kill -9 "$stopped_pool" 2>/dev/null
echo "ok: $stall RECOVERING when its pool stopped heartbeating, then finished on another pool"
echo "PASS"
