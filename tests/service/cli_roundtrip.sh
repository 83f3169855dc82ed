#!/usr/bin/env bash
# The real binaries end to end: mamba-coordinator on a free loopback port with a token and a
# SQLite file; mambactl submits (twice with one key), lists, cancels; the coordinator is stopped
# and started again on the same file, and the job is still there. Then over TLS with a data root:
# paths outside it ("..", a symbolic link out, an absolute one) are refused naming the field, a
# relative one inside is stored absolute, and a client that does not speak TLS gets nothing.
# Bounded: every step times out.
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
kill "$pid"; wait "$pid"; pid=""

# TLS (a self-signed certificate for 127.0.0.1) and the roots.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=127.0.0.1" \
  -addext "subjectAltName=IP:127.0.0.1" -keyout "$work/key.pem" -out "$work/cert.pem" \
  >/dev/null 2>&1 || fail "openssl"
mkdir -p "$work/data" "$work/outside"
echo "some text to train on, long enough for a window or two of bytes." >"$work/data/corpus.txt"
echo "secret" >"$work/outside/secret.txt"
ln -s "$work/outside" "$work/data/link"
"$coordinator" --listen 127.0.0.1:0 --db "$work/tls.db" --tls_cert "$work/cert.pem" \
  --tls_key "$work/key.pem" --data_root "$work/data" --checkpoint_root "$work/ckpt" \
  >"$work/coordinator.log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/coordinator.log" && break; sleep 0.1; done
port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$work/coordinator.log")
[[ -n $port ]] || fail "the TLS coordinator did not start"
tls() { timeout 30 "$ctl" --coordinator "127.0.0.1:$port" --tls_ca "$work/cert.pem" "$@"; }
out=$(timeout 30 "$ctl" --coordinator "127.0.0.1:$port" --timeout 3s list 2>&1)
[[ $out == *UNAVAILABLE* ]] || fail "a plaintext client got an answer: $out"
text_job() {
  echo "{\"data\":{\"textFile\":{\"path\":\"$1\",\"seqLen\":8}},\"steps\":1$2}" >"$work/t.json"
  tls submit "$work/t.json" 2>&1
}
out=$(text_job "../outside/secret.txt" "")
[[ $out == *"INVALID_ARGUMENT: data.text_file.path"*"lies outside --data_root"* ]] || fail "..: $out"
out=$(text_job "link/secret.txt" "")
[[ $out == *"INVALID_ARGUMENT: data.text_file.path"* ]] || fail "a symbolic link out: $out"
out=$(text_job "$work/outside/secret.txt" "")
[[ $out == *"INVALID_ARGUMENT: data.text_file.path"* ]] || fail "an absolute path out: $out"
out=$(text_job "corpus.txt" ',"checkpoint":{"dir":"/tmp/elsewhere"}')
[[ $out == *"INVALID_ARGUMENT: checkpoint.dir"*"--checkpoint_root"* ]] || fail "checkpoint.dir: $out"
out=$(text_job "corpus.txt" "")
[[ $out == submitted* ]] || fail "a path inside the root: $out"
out=$(tls --json get "$(echo "$out" | awk '{print $NF}')")
[[ $out == *"\"path\": \"$work/data/corpus.txt\""* ]] || fail "the path is not stored absolute: $out"
echo "PASS"
