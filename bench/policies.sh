#!/usr/bin/env bash
# What the per-request policies add to latency at a fixed rate, side by side in one run: the same ~1 KB chat
# requests at 3,000 requests/s (oha, open loop with latency correction) straight to the upstream and through
# sheepdog configured four ways, each with the request log and metrics on:
#   plain     no clients, budgets or rules (anonymous on loopback)
#   keys      a client key checked on every request, with rpm and tpm limits (issue 11's budget: ≤ 0.02 ms p99)
#   policies  keys, a daily budget and the alias `auto` of 50 routing rules, 49 missed (issue 10: ≤ 0.05 ms)
#   redis     plain with `[state] backend = "redis"` (issue 13: ≤ 0.05 ms p99), only with --redis
# Each target runs N interleaved repetitions (default 3); the table quotes the median repetition's p50 / p99
# (by p99) and what each variant adds over `plain`, then every repetition.
#
# Usage: bench/policies.sh [--rate N] [--seconds S] [--reps N] [--redis]
# Layout on a 2-core machine: the gateway on core 0; nginx and oha share core 1. Needs nginx and oha (installed
# when missing). Writes bench/out-policies/.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=3000; SECS=10; REPS=3; REDIS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) RATE=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --redis) REDIS=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; }
command -v oha >/dev/null || cargo install oha --locked
cargo build --release --locked --bin sheepdog
SHEEPDOG=${SHEEPDOG:-$PWD/target/release/sheepdog}
OUT=$PWD/bench/out-policies; rm -rf "$OUT"; mkdir -p "$OUT/tmp"
ulimit -n "$(ulimit -Hn)"

BODY='{"id":"chatcmpl-bench","object":"chat.completion","created":1735689600,"model":"gpt-4.1","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a fixed answer from nginx for benchmarks."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":12,"total_tokens":262}}'
cat > "$OUT/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $OUT/nginx.pid;
error_log $OUT/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $OUT/tmp;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:18281; listen 127.0.0.1:18282; listen 127.0.0.1:18283;
    location = /v1/chat/completions { default_type application/json; return 200 '$BODY'; }
  }
}
NGINX

# One config per variant; all listen on the same port in turn.
config() { # $1 = variant
  printf '[server]\nlisten = "127.0.0.1:18280"\n[health]\ninterval = "30s"\nidle_interval = "30s"\n'
  printf '[log]\npath = "%s/%s.db"\n' "$OUT" "$1"
  for e in a:18281 b:18282 c:18283; do
    printf '[[endpoints]]\nname = "%s"\nbase_url = "http://127.0.0.1:%s/v1"\napi_keys = ["sk-%s"]\nmodels = ["gpt-4.1"]\n' \
      "${e%%:*}" "${e##*:}" "${e%%:*}"
  done
  printf '[[models]]\nname = "gpt-4.1"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n'
  case "$1" in
    redis) printf '[state]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:6379"\nkey_prefix = "bench-%s"\n' "$$" ;;
    keys|policies) VARIANT=$1 python3 - <<'PY'
import hashlib, os
print('[[clients]]\nname = "bench"\nkey_hash = "sha256:%s"\nrpm = 100000000\ntpm = 100000000000' % hashlib.sha256(b"sk-bench-client").hexdigest())
if os.environ["VARIANT"] == "policies":
    print('[[budgets]]\nname = "daily"\nwarn_usd = 1000000\nlimit_usd = 2000000')
    for i in range(49):
        cond = 'keywords = ["refund%d", "invoice%d"]' % (i, i) if i % 2 else 'regex = "(?i)\\\\bticket-%d\\\\b"' % i
        print('[[routes]]\nname = "rule%d"\nmodel = "auto"\ntarget = "gpt-4.1"\n%s' % (i, cond))
    print('[[routes]]\nname = "rest"\nmodel = "auto"\ntarget = "gpt-4.1"\ndefault = true')
PY
    ;;
  esac
}
request() { # $1 = model
  MODEL=$1 python3 -c '
import json, os
print(json.dumps({"model": os.environ["MODEL"], "max_tokens": 64, "messages": [
    {"role": "system", "content": "You are a helpful assistant. " * 8},
    {"role": "user", "content": "Summarise the following text in one sentence: " + "lorem ipsum dolor sit amet " * 22}]}))'
}
request gpt-4.1 > "$OUT/plain.json"; request auto > "$OUT/auto.json"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
taskset -c 1 nginx -c "$OUT/nginx.conf" & PIDS+=($!)

load() { # $1 = name, $2 = url, $3 = body file, $4.. = extra oha args
  local name=$1 url=$2 body=$3; shift 3
  taskset -c 1 oha -z "${SECS}s" -q "$RATE" --latency-correction -c 64 --no-tui --output-format json \
    -m POST -H 'content-type: application/json' "$@" -D "$body" "$url" > "$OUT/$name.json"
}
VARIANTS=(plain keys policies); [ "$REDIS" = 1 ] && VARIANTS+=(redis)
for v in "${VARIANTS[@]}"; do config "$v" > "$OUT/$v.toml"; done
for rep in $(seq 1 "$REPS"); do
  load "direct-$rep" http://127.0.0.1:18281/v1/chat/completions "$OUT/plain.json"
  for v in "${VARIANTS[@]}"; do
    taskset -c 0 "$SHEEPDOG" serve --config "$OUT/$v.toml" > "$OUT/$v-$rep.log" 2>&1 & GW=$!
    for _ in $(seq 1 100); do curl -sf -o /dev/null http://127.0.0.1:18280/health && break; sleep 0.1; done
    body=$OUT/plain.json; auth=()
    case "$v" in
      keys) auth=(-H 'authorization: Bearer sk-bench-client') ;;
      policies) auth=(-H 'authorization: Bearer sk-bench-client'); body=$OUT/auto.json ;;
    esac
    # Warm-up: connection pools, lazily built state.
    taskset -c 1 oha -n 2000 -c 16 --no-tui -m POST -H 'content-type: application/json' "${auth[@]}" -D "$body" \
      http://127.0.0.1:18280/v1/chat/completions > /dev/null
    load "$v-$rep" http://127.0.0.1:18280/v1/chat/completions "$body" "${auth[@]}"
    kill -TERM "$GW"; wait "$GW" 2>/dev/null || true
  done
done

python3 - "$OUT" "$REPS" "${VARIANTS[@]}" <<'PY'
import json, statistics, sys
out, n_reps, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
every = {}
def reps(name):
    rs = []
    for i in range(1, n_reps + 1):
        j = json.load(open(f"{out}/{name}-{i}.json"))
        codes = j.get("statusCodeDistribution", {})
        bad = sum(v for k, v in codes.items() if k != "200")
        p = j["latencyPercentiles"]
        rs.append((p["p50"] * 1e3, p["p99"] * 1e3, j["summary"]["requestsPerSec"], bad))
    every[name] = ", ".join(f"{r[0]:.3f}/{r[1]:.3f}" for r in rs)
    rs.sort(key=lambda r: r[1])
    return rs[len(rs) // 2]  # the median repetition by p99
rows = {n: reps(n) for n in ["direct"] + variants}
print(f"| target | p50 ms | p99 ms | req/s | non-200 | added p50 | added p99 | over plain p50 | over plain p99 |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
d, base = rows["direct"], rows["plain"]
for n, r in rows.items():
    add = "" if n == "direct" else f"{r[0]-d[0]:+.3f} | {r[1]-d[1]:+.3f}"
    over = "" if n in ("direct", "plain") else f"{r[0]-base[0]:+.3f} | {r[1]-base[1]:+.3f}"
    print(f"| {n} | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.0f} | {r[3]} | {add or ' | '} | {over or ' | '} |")
print()
print("every repetition, p50/p99 ms in run order:")
for n, e in every.items():
    print(f"- {n}: {e}")
PY
