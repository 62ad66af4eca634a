#!/usr/bin/env bash
# Instructions sheepdog executes per request and per relayed stream chunk, counted by callgrind: repeatable
# for the same binary and inputs whatever else the machine is doing, so small changes to the request path can
# be compared where wall-clock figures drown in noise.
#
# Usage: bench/instructions.sh [--top N] [--policies]
#   --top N      also print the N functions with the most instructions of their own (callgrind_annotate), for
#                the requests and for the streams (their profiles kept in bench/out-instr/{requests,hidden,asked})
#   --policies   the same requests from a client with a key, rpm and tpm limits, under a daily budget, for the
#                alias `auto` of 50 routing rules (49 that do not match, then the default)
# Needs valgrind and nginx (installed when missing); the requests are sent by `loadgen send`. Writes
# bench/out-instr/. SHEEPDOG=path runs another build of the gateway (e.g. an older commit's, to compare).
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=0; POLICIES=0
while [ $# -gt 0 ]; do
  case "$1" in
    --top) TOP=$2; shift 2 ;;
    --policies) POLICIES=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; }
command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; }
cargo build --release --locked --bin sheepdog --example loadgen
SHEEPDOG=${SHEEPDOG:-$PWD/target/release/sheepdog}; LOADGEN=$PWD/target/release/examples/loadgen
OUT=$PWD/bench/out-instr; rm -rf "$OUT"; mkdir -p "$OUT/tmp"
N=2000; STREAMS=20; CHUNKS=200

BODY='{"id":"chatcmpl-bench","object":"chat.completion","created":1735689600,"model":"gpt-4.1","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a fixed answer from nginx for benchmarks."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":12,"total_tokens":262}}'
cat > "$OUT/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $OUT/nginx.pid;
error_log $OUT/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $OUT/tmp;
  server {
    listen 127.0.0.1:18181; listen 127.0.0.1:18182; listen 127.0.0.1:18183;
    location = /v1/chat/completions { default_type application/json; return 200 '$BODY'; }
  }
}
NGINX
# Probes off (an hour apart) so that only requests are counted; the request log and metrics stay on.
{
  printf '[server]\nlisten = "127.0.0.1:18180"\n[health]\ninterval = "1h"\nidle_interval = "1h"\n'
  for e in a:18181 b:18182 c:18183; do
    printf '[[endpoints]]\nname = "%s"\nbase_url = "http://127.0.0.1:%s/v1"\napi_keys = ["sk-%s"]\nmodels = ["gpt-4.1"]\n' \
      "${e%%:*}" "${e##*:}" "${e%%:*}"
  done
  printf '[[endpoints]]\nname = "s"\nbase_url = "http://127.0.0.1:18185/v1"\nmodels = ["mock-stream"]\n'
  printf '[[models]]\nname = "gpt-4.1"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n'
  printf '[[models]]\nname = "mock-stream"\ninput_usd_per_mtok = 0.1\noutput_usd_per_mtok = 0.4\n'
  if [ "$POLICIES" = 1 ]; then
    python3 - <<'PY'
import hashlib
print('[[clients]]\nname = "bench"\nkey_hash = "sha256:%s"\nrpm = 100000000\ntpm = 100000000000' % hashlib.sha256(b"sk-bench-client").hexdigest())
print('[[budgets]]\nname = "daily"\nwarn_usd = 1000000\nlimit_usd = 2000000')
for i in range(49):
    cond = 'keywords = ["refund%d", "invoice%d"]' % (i, i) if i % 2 else 'regex = "(?i)\\\\bticket-%d\\\\b"' % i
    print('[[routes]]\nname = "rule%d"\nmodel = "auto"\ntarget = "gpt-4.1"\n%s' % (i, cond))
print('[[routes]]\nname = "rest"\nmodel = "auto"\ntarget = "gpt-4.1"\ndefault = true')
PY
  fi
} > "$OUT/sheepdog.toml"
MODEL=gpt-4.1; AUTH=()
if [ "$POLICIES" = 1 ]; then MODEL=auto; AUTH=(--header 'authorization: Bearer sk-bench-client'); fi
MODEL=$MODEL python3 - > "$OUT/request.json" <<'PY'
import json, os
print(json.dumps({"model": os.environ["MODEL"], "max_tokens": 64, "messages": [
    {"role": "system", "content": "You are a helpful assistant. " * 8},
    {"role": "user", "content": "Summarise the following text in one sentence: " + "lorem ipsum dolor sit amet " * 22}]}))
PY

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
nginx -c "$OUT/nginx.conf" & PIDS+=($!)
"$SHEEPDOG" mock --listen 127.0.0.1:18185 --models mock-stream --answer-tokens $CHUNKS --tokens-per-sec 0 \
  > "$OUT/mock.log" 2>&1 & PIDS+=($!)
valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.%p" "$SHEEPDOG" serve --config "$OUT/sheepdog.toml" \
  > "$OUT/sheepdog.log" 2>&1 & VG=$!; PIDS+=($VG)
for _ in $(seq 1 120); do curl -s -o /dev/null http://127.0.0.1:18180/health && break; sleep 0.5; done
req() { "$LOADGEN" send --requests "$1" --connections 4 "${AUTH[@]}" --body "$OUT/request.json" \
  --url http://127.0.0.1:18180/v1/chat/completions; }
streams() { "$LOADGEN" stream --url http://127.0.0.1:18180/v1/chat/completions --streams $STREAMS --chunks $CHUNKS \
  --interval-ms 0 --model mock-stream "$@" > /dev/null; }
total() { # instructions so far, all threads (a fresh dump each time)
  callgrind_control -d "$VG" > /dev/null 2>&1
  sleep 0.5
  local sum=0 f
  for f in "$OUT"/callgrind.*; do
    sum=$((sum + $(sed -n 's/^summary: //p;s/^totals: //p' "$f" | head -1)))
  done
  echo "$sum"
}
req 300; [ "$POLICIES" = 1 ] || streams  # warm-up: pools, caches, lazily built state
callgrind_control -z "$VG" > /dev/null 2>&1; sleep 0.5; rm -f "$OUT"/callgrind.*
t0=$(total); req $N; sleep 0.5; t1=$(total)   # the log writer's batch is written within 0.1 s
per_req=$(( (t1 - t0) / N ))
if [ "$POLICIES" = 1 ]; then
  echo "instructions per request (~1 KB chat, 3 endpoints, log and metrics on; client key, rpm/tpm, budget, 50 routing rules): $per_req"
else
  streams; sleep 0.5; t2=$(total)
  streams --include-usage; sleep 0.5; t3=$(total)
  per_chunk=$(( (t2 - t1) / (STREAMS * CHUNKS) ))
  echo "instructions per request (~1 KB chat, 3 endpoints, log and metrics on): $per_req"
  echo "instructions per relayed stream chunk ($STREAMS streams x $CHUNKS chunks, setup included): $per_chunk"
  echo "  the same, for clients that ask for usage (nothing hidden from them): $(( (t3 - t2) / (STREAMS * CHUNKS) ))"
fi
top() { # the costliest functions of the last dump, by their own instructions; the dump is kept in $OUT/$1
  callgrind_annotate --threshold=100 "$OUT"/callgrind.* 2>/dev/null | grep -E '^ *[0-9,]+ \(' | sed -n "9,$((8 + TOP))p" \
    | sed 's#/root/.cargo/registry/src/[^/]*/##; s# \[/.*##'
  mkdir -p "$OUT/$1"; mv "$OUT"/callgrind.* "$OUT/$1/"
}
if [ "$TOP" != 0 ]; then
  callgrind_control -z "$VG" > /dev/null 2>&1; sleep 0.5; rm -f "$OUT"/callgrind.*
  req $N; sleep 0.5; callgrind_control -d "$VG" > /dev/null 2>&1; sleep 0.5
  echo "the $TOP costliest functions over $N requests:"; top requests
  if [ "$POLICIES" != 1 ]; then
    callgrind_control -z "$VG" > /dev/null 2>&1; sleep 0.5; rm -f "$OUT"/callgrind.*
    streams; sleep 0.5; callgrind_control -d "$VG" > /dev/null 2>&1; sleep 0.5
    echo "the $TOP costliest functions over $((STREAMS * CHUNKS)) chunks (usage hidden):"; top hidden
    callgrind_control -z "$VG" > /dev/null 2>&1; sleep 0.5; rm -f "$OUT"/callgrind.*
    streams --include-usage; sleep 0.5; callgrind_control -d "$VG" > /dev/null 2>&1; sleep 0.5
    echo "the $TOP costliest functions over $((STREAMS * CHUNKS)) chunks (usage asked):"; top asked
  fi
fi
