#!/usr/bin/env bash
# Side-by-side overhead benchmark: the same loads straight to the upstream, through sheepdog, through nginx as a
# reverse proxy (the floor for any HTTP proxy hop on this machine) and through LiteLLM proxy.
#
# Usage: bench/run.sh [--quick] [--no-litellm] [--only fixed|failover|stream]
#   --quick        3 s per repetition instead of 10 s (a smoke run of the harness itself)
#   --no-litellm   skip LiteLLM (it takes minutes to install)
#   --only S       run one section: the fixed-rate and throughput loads, the failover drills or the streams
# A full run (no option) writes its tables into BENCHMARKS.md and its chart into bench/results/. SHEEPDOG=path
# runs another build of the gateway (e.g. an older commit's, to compare).
# Installs what it needs: nginx from Debian, oha from crates.io, LiteLLM and matplotlib into bench/.venv, and builds
# sheepdog and the loadgen example in release mode. Writes bench/out/*.json, bench/out/table.md and
# bench/out/overhead.png (bench/report.py).
#
# Layout on a 2-core machine: the gateway under test runs alone on core 0; the upstream (nginx, sheepdog mock) and
# the load generators share core 1, for every target alike. "direct" is therefore the cost of load generator plus
# upstream, and a gateway's figures show what it adds when it has a core of its own, as it would in production.
# Each fixed-rate load is measured as 3 interleaved repetitions per target; the tables quote the median repetition.
set -euo pipefail
cd "$(dirname "$0")/.."
REP=10; LITELLM=1; ONLY=
args=(); while [ $# -gt 0 ]; do
  if [ "$1" = --only ]; then args+=("--only=${2:-}"); shift 2; else args+=("$1"); shift; fi
done
for a in "${args[@]}"; do
  case "$a" in
    --quick) REP=3 ;;
    --only=*) ONLY=${a#--only=} ;;
    --no-litellm) LITELLM=0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
GW_CPU=0; AUX_CPU=1
OUT=bench/out; rm -rf "$OUT"; mkdir -p "$OUT/runs"
ulimit -n "$(ulimit -Hn)"  # 1,000 streams need ~2,000 descriptors in a gateway
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge 4096 ] || { echo "open-files limit $(ulimit -n) is below 4096" >&2; exit 1; }

command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; }
command -v oha >/dev/null || cargo install oha --locked
if [ ! -x bench/.venv/bin/python ]; then python3 -m venv bench/.venv; fi
bench/.venv/bin/python -c 'import matplotlib' 2>/dev/null || bench/.venv/bin/pip install -q matplotlib
if [ "$LITELLM" = 1 ]; then
  bench/.venv/bin/python -c 'import litellm' 2>/dev/null || bench/.venv/bin/pip install -q 'litellm[proxy]'
fi
cargo build --release --locked --bin sheepdog --example loadgen
SHEEPDOG=${SHEEPDOG:-target/release/sheepdog}; LOADGEN=target/release/examples/loadgen

BODY='{"id":"chatcmpl-bench","object":"chat.completion","created":1735689600,"model":"gpt-4.1","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a fixed answer from nginx for benchmarks."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":12,"total_tokens":262}}'
MODELS='{"object":"list","data":[{"id":"gpt-4.1","object":"model","created":1735689600,"owned_by":"bench"}]}'
mkdir -p "$OUT/nginx-tmp" "$OUT/proxy-tmp"
# The upstream: nginx answering a fixed OpenAI body on three ports (the three endpoints).
cat > "$OUT/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $PWD/$OUT/nginx.pid;
error_log $PWD/$OUT/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $PWD/$OUT/nginx-tmp;
  server {
    listen 127.0.0.1:18081; listen 127.0.0.1:18082; listen 127.0.0.1:18083;
    location = /v1/chat/completions { default_type application/json; return 200 '$BODY'; }
    location = /v1/models { default_type application/json; return 200 '$MODELS'; }
  }
}
NGINX
# The reference proxy: nginx proxy_pass with keep-alive to the same three upstreams, one worker.
cat > "$OUT/nginx-proxy.conf" <<NGINX
worker_processes 1;
daemon off;
pid $PWD/$OUT/nginx-proxy.pid;
error_log $PWD/$OUT/nginx-proxy-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $PWD/$OUT/proxy-tmp;
  proxy_temp_path $PWD/$OUT/proxy-tmp;
  upstream up { server 127.0.0.1:18081; server 127.0.0.1:18082; server 127.0.0.1:18083; keepalive 256; }
  upstream streams { server 127.0.0.1:18085; keepalive 1024; }
  server {
    listen 127.0.0.1:18084;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  upstream mocks {
    server 127.0.0.1:18097 max_fails=3 fail_timeout=30s; server 127.0.0.1:18098 max_fails=3 fail_timeout=30s;
    server 127.0.0.1:18099 max_fails=3 fail_timeout=30s; keepalive 256;
  }
  server {
    listen 127.0.0.1:18087;
    location / {
      proxy_pass http://mocks; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_next_upstream error timeout http_500 http_502 http_503 http_429 non_idempotent;
      proxy_connect_timeout 2s; proxy_read_timeout 2s;
    }
  }
  server {
    listen 127.0.0.1:18086;
    location / {
      proxy_pass http://streams; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off;
    }
  }
}
NGINX
# sheepdog: three nginx endpoints for gpt-4.1, three endpoints on one sheepdog mock for the streaming runs; health
# probes every 2 s (the fast end of the user's range); metrics scraped every second during the runs.
{
  printf '[server]\nlisten = "127.0.0.1:18080"\n[health]\ninterval = "2s"\nidle_interval = "2s"\n'
  for e in a:18081 b:18082 c:18083; do
    printf '[[endpoints]]\nname = "%s"\nbase_url = "http://127.0.0.1:%s/v1"\napi_keys = ["sk-bench-%s"]\nmodels = ["gpt-4.1"]\n' \
      "${e%%:*}" "${e##*:}" "${e%%:*}"
  done
  for e in s1 s2 s3; do
    printf '[[endpoints]]\nname = "%s"\nbase_url = "http://127.0.0.1:18085/v1"\napi_keys = ["sk-bench-%s"]\nmodels = ["mock-stream"]\n' "$e" "$e"
  done
  # The failover runs: model fo-plain on mocks 18091-18093, fo-hedged (hedge_after 100ms) on 18094-18096.
  for m in 1 2 3 4 5 6; do
    model=fo-plain; [ $m -gt 3 ] && model=fo-hedged
    printf '[[endpoints]]\nname = "fo%s"\nbase_url = "http://127.0.0.1:1809%s/v1"\napi_keys = ["sk-bench-fo"]\n' $m $m
    printf 'first_byte_timeout = "2s"\nmodels = ["%s"]\n' $model
  done
  printf '[[models]]\nname = "gpt-4.1"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n'
  printf '[[models]]\nname = "mock-stream"\ninput_usd_per_mtok = 0.1\noutput_usd_per_mtok = 0.4\n'
  printf '[[models]]\nname = "fo-plain"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n'
  printf '[[models]]\nname = "fo-hedged"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\nhedge_after = "100ms"\n'
} > "$OUT/sheepdog.toml"
cat > "$OUT/litellm.yaml" <<YAML
model_list:
  - model_name: gpt-4.1
    litellm_params: {model: openai/gpt-4.1, api_base: "http://127.0.0.1:18081/v1", api_key: sk-bench}
  - model_name: mock-stream
    litellm_params: {model: openai/mock-stream, api_base: "http://127.0.0.1:18085/v1", api_key: sk-bench}
YAML
# A ~1 KB request body (no `user` field: see shared/NOTES.md on LiteLLM without a database).
python3 - > "$OUT/request.json" <<'PY'
import json
print(json.dumps({"model": "gpt-4.1", "max_tokens": 64, "messages": [
    {"role": "system", "content": "You are a helpful assistant. " * 8},
    {"role": "user", "content": "Summarise the following text in one sentence: " + "lorem ipsum dolor sit amet " * 22}]}))
PY

python3 -c "import json,sys;d=json.load(open(sys.argv[1]));d['model']='fo-plain';print(json.dumps(d))" \
  "$OUT/request.json" > "$OUT/request-fo-plain.json"
sed 's/"fo-plain"/"fo-hedged"/' "$OUT/request-fo-plain.json" > "$OUT/request-fo-hedged.json"

PIDS=()
declare -A MOCK
cleanup() {
  for p in "${PIDS[@]}" "${MOCK[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f -- '--name m1809' 2>/dev/null || true  # failover mocks restarted in a subshell
  wait 2>/dev/null || true
}
trap cleanup EXIT
# The failover runs' upstreams: nine small mocks (three per gateway), answering at once.
fo_mock() { # port
  taskset -c $AUX_CPU $SHEEPDOG mock --listen "127.0.0.1:$1" --name "m$1" --models fo-plain,fo-hedged \
    --tokens-per-sec 0 >> "$OUT/fo-mocks.log" 2>&1 &
  MOCK[$1]=$!
}
for port in 18091 18092 18093 18094 18095 18096 18097 18098 18099; do fo_mock $port; done
taskset -c $AUX_CPU nginx -c "$PWD/$OUT/nginx.conf" & PIDS+=($!)
taskset -c $AUX_CPU $SHEEPDOG mock --listen 127.0.0.1:18085 --models mock-stream --answer-tokens 200 \
  --tokens-per-sec 20 --stamp > "$OUT/mock.log" 2>&1 & PIDS+=($!)
taskset -c $GW_CPU $SHEEPDOG serve --config "$OUT/sheepdog.toml" > "$OUT/sheepdog.log" 2>&1 & SD=$!; PIDS+=($SD)
taskset -c $GW_CPU nginx -c "$PWD/$OUT/nginx-proxy.conf" & NP=$!; PIDS+=($NP)
LL=
if [ "$LITELLM" = 1 ]; then
  LITELLM_MASTER_KEY=sk-litellm-bench LITELLM_LOCAL_MODEL_COST_MAP=True taskset -c $GW_CPU \
    bench/.venv/bin/litellm --config "$OUT/litellm.yaml" --port 18090 --num_workers 1 > "$OUT/litellm.log" 2>&1 & LL=$!
  PIDS+=($LL)
fi
wait_for() { for _ in $(seq 1 240); do curl -s -o /dev/null "$1" && return 0; sleep 0.5; done; echo "no answer from $1" >&2; exit 1; }
wait_for http://127.0.0.1:18081/v1/models
wait_for http://127.0.0.1:18085/health
wait_for http://127.0.0.1:18080/health
wait_for http://127.0.0.1:18084/v1/models
[ -n "$LL" ] && wait_for http://127.0.0.1:18090/health/liveliness
# A Prometheus-like scrape of sheepdog's /metrics every second, on the auxiliary core.
( while sleep 1; do curl -s -o /dev/null http://127.0.0.1:18080/metrics || true; done ) & PIDS+=($!)

# CPU seconds (user + system) used so far by a process and its descendants.
cpu_of() {
  local total=0 p
  for p in $1 $(pgrep -P "$1" 2>/dev/null || true); do
    [ -r "/proc/$p/stat" ] && total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$total"
}
declare -A URL PID
URL[direct]=http://127.0.0.1:18081/v1/chat/completions
URL[sheepdog]=http://127.0.0.1:18080/v1/chat/completions; PID[sheepdog]=$SD
URL[nginx-proxy]=http://127.0.0.1:18084/v1/chat/completions; PID[nginx-proxy]=$(pgrep -P "$NP" | head -1)
URL[litellm]=http://127.0.0.1:18090/v1/chat/completions; PID[litellm]=$LL
auth() { [ "$1" = litellm ] && echo "authorization: Bearer sk-litellm-bench" || echo "x-bench: 1"; }

# One oha run: target, rate (0 = as fast as possible), seconds, output file. The load generator is pinned to
# the auxiliary core; -q holds the rate and --latency-correction counts queueing (no coordinated omission).
oha_run() {
  local t=$1 rate=$2 secs=$3 file=$4 body=${5:-$OUT/request.json} q=()
  [ "$rate" != 0 ] && q=(-q "$rate" --latency-correction)
  local before=0; [ -n "${PID[$t]:-}" ] && before=$(cpu_of "${PID[$t]}")
  taskset -c $AUX_CPU oha -z "${secs}s" -c 64 "${q[@]}" --no-tui --output-format json -m POST \
    -H 'content-type: application/json' -H "$(auth "$t")" -D "$body" "${URL[$t]}" > "$file"
  if [ -n "${PID[$t]:-}" ]; then
    echo "$(( $(cpu_of "${PID[$t]}") - before ))" > "$file.cpu"
  fi
}
summary() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));p=d['latencyPercentiles'];print(round(d['summary']['requestsPerSec']),'req/s  p50',round(p['p50']*1000,3),'ms  p99',round(p['p99']*1000,3),'ms')" "$1"; }

# Fixed-rate and max-throughput loads: warm-up, then 3 interleaved repetitions per target.
load() { # rate targets...
  local rate=$1; shift
  for t in "$@"; do oha_run "$t" "$rate" 2 /dev/null; done
  for rep in 1 2 3; do
    for t in "$@"; do
      oha_run "$t" "$rate" "$REP" "$OUT/runs/$t-$rate-$rep.json"
      echo "$t @ ${rate/#0/max} #$rep: $(summary "$OUT/runs/$t-$rate-$rep.json")"
    done
  done
}
section() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }
if section fixed; then
load 1000 direct sheepdog nginx-proxy
load 3000 direct sheepdog nginx-proxy
load 0 direct sheepdog nginx-proxy
fi
if section fixed && [ -n "$LL" ]; then
  load 20 direct sheepdog nginx-proxy litellm
  load 1000 litellm
  load 0 litellm
fi

# Failover under load: 1,000 req/s for 20 s through three upstream mocks per gateway; from 5 s to 15 s one of
# them misbehaves: answers 500, hangs (accepts, never answers), or its process is killed (and restarted at 15 s).
# sheepdog as configured above (breaker 3 failures / 30 s recovery, first_byte_timeout 2s, max_attempts 3), once
# plain and once with hedge_after = 100ms; nginx with its passive failover switched on (proxy_next_upstream on
# errors, timeouts, 500/502/503/429, for POST too; max_fails=3 fail_timeout=30s; 2 s timeouts).
URL[sheepdog-hedged]=${URL[sheepdog]}; PID[sheepdog-hedged]=$SD
URL[nginx-failover]=http://127.0.0.1:18087/v1/chat/completions
declare -A FO_PORT=([sheepdog]=18092 [sheepdog-hedged]=18095 [nginx-failover]=18098)
declare -A FO_BODY=([sheepdog]=$OUT/request-fo-plain.json [sheepdog-hedged]=$OUT/request-fo-hedged.json
                    [nginx-failover]=$OUT/request-fo-plain.json)
fault() { # port mode|killed|restart
  case "$2" in
    killed) kill -9 "${MOCK[$1]}" 2>/dev/null || true ;;
    restart) fo_mock "$1" ;;
    *) curl -s -o /dev/null -X POST "http://127.0.0.1:$1/_mock/faults" -d "{\"mode\":\"$2\"}" ;;
  esac
}
if section failover; then
for t in sheepdog sheepdog-hedged nginx-failover; do oha_run "$t" 1000 2 /dev/null "${FO_BODY[$t]}"; done
for f in none error_500 hang killed; do
  for t in sheepdog sheepdog-hedged nginx-failover; do
    port=${FO_PORT[$t]}; fpid=
    if [ "$f" != none ]; then
      ( sleep 5; fault "$port" "$f"; sleep 10; if [ "$f" = killed ]; then fault "$port" restart; else fault "$port" ok; fi ) &
      fpid=$!
    fi
    oha_run "$t" 1000 20 "$OUT/runs/fault-$f-$t.json" "${FO_BODY[$t]}"
    [ -n "$fpid" ] && wait "$fpid" 2>/dev/null || true
    echo "fault $f via $t: $(summary "$OUT/runs/fault-$f-$t.json") $(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['statusCodeDistribution'])" "$OUT/runs/fault-$f-$t.json")"
  done
  sleep 15 # the faulted upstreams' breakers (30 s) close again before the next fault; each waited 20 s already
done
fi

# Streaming: 1,000 concurrent streams of 200 chunks paced at 20 chunks/s by the mock, which stamps every chunk
# with the time it wrote it. Per target: a cold burst of 1,000 short streams first (the gateway's upstream pool is
# empty: every stream needs a new upstream connection); then 3 interleaved repetitions of the measured run on warm
# connection pools: time to first token, per-chunk transit time (mock write to client read), lateness against the
# mock's pacing, and the gateway's RSS once all 1,000 streams are open. LiteLLM runs once (it takes minutes).
stream_run() { # name url pid chunks out
  local extra=()
  [ "$1" = litellm ] && extra=(--header "authorization: Bearer sk-litellm-bench")
  [ -n "$3" ] && extra+=(--hold-pid "$3")
  taskset -c $AUX_CPU $LOADGEN stream --url "$2" --streams 1000 --chunks "$4" --interval-ms 50 --model mock-stream \
    "${extra[@]}" --out "$5" > /dev/null 2>> "$OUT/loadgen.log" || echo "stream run $1 failed" >&2
  python3 - "$5" "$1" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
t = d.get("transit_ms") or {}
print(f"stream {sys.argv[2]}: {d['ok']} ok, {d['errors']} errors; ttft p50 {d['ttft_ms']['p50']} ms; "
      f"transit p50 {t.get('p50')} p99 {t.get('p99')} ms; rss {d.get('rss_kb_at_full_concurrency')} kB")
PY
}
declare -A SURL=([direct]=http://127.0.0.1:18085/v1/chat/completions [sheepdog]=http://127.0.0.1:18080/v1/chat/completions
                 [nginx-proxy]=http://127.0.0.1:18086/v1/chat/completions [litellm]=http://127.0.0.1:18090/v1/chat/completions)
STARGETS=(direct sheepdog nginx-proxy)
if section stream; then
for t in "${STARGETS[@]}"; do stream_run "$t" "${SURL[$t]}" "" 5 "$OUT/runs/stream-cold-$t.json"; done
for rep in 1 2 3; do
  for t in "${STARGETS[@]}"; do stream_run "$t" "${SURL[$t]}" "${PID[$t]:-}" 200 "$OUT/runs/stream-$t-$rep.json"; done
done
if [ -n "$LL" ]; then
  stream_run litellm "${SURL[litellm]}" "" 5 "$OUT/runs/stream-cold-litellm.json"
  stream_run litellm "${SURL[litellm]}" "$LL" 200 "$OUT/runs/stream-litellm-1.json"
fi
fi

ps -o rss= -p "$SD" > "$OUT/sheepdog-rss-kb.txt"
{ echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"; echo "cpu: $(lscpu | sed -n 's/Model name: *//p') x $(nproc)";
  echo "kernel: $(uname -r)"; echo "sheepdog: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (modified)')";
  echo "rustc: $(rustc --version)"; echo "oha: $(oha --version)"; echo "nginx: $(nginx -v 2>&1 | sed 's/.*: //')";
  [ -n "$LL" ] && echo "litellm: $(bench/.venv/bin/pip show litellm | sed -n 's/Version: //p')";
  echo "command: bench/run.sh $*"; echo "repetition: ${REP} s x 3 per target and load"; } > "$OUT/meta.txt"
# What the request log and metrics saw during the whole run (both were on throughout).
python3 - "$OUT" <<'PY' > "$OUT/extra.md"
import re, sqlite3, sys, urllib.request
out = sys.argv[1]
m = urllib.request.urlopen("http://127.0.0.1:18080/metrics").read().decode()
val = lambda name: sum(float(x) for x in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", m, re.M))
rows = sqlite3.connect(f"file:{out}/sheepdog.db?mode=ro", uri=True).execute("SELECT COUNT(*) FROM requests").fetchone()[0]
print("### sheepdog's own accounting of the run\n\n| | |\n| --- | --- |")
print(f"| client requests answered (request log rows so far) | {rows:,} |")
print(f"| request log rows dropped | {val('sheepdog_request_log_dropped_total'):.0f} |")
statuses = {}
for s, n in re.findall(r'sheepdog_requests_total{[^}]*status="(\w+)"} (\S+)', m):
    statuses[s] = statuses.get(s, 0) + float(n)
print(f"| upstream attempts by status | {', '.join(f'{s}: {n:,.0f}' for s, n in sorted(statuses.items()))} |")
print(f"| health probes sent | {val('sheepdog_probes_total'):,.0f} |")
PY
if [ "$REP" = 10 ] && [ -z "$ONLY" ]; then
  bench/.venv/bin/python bench/report.py "$OUT" --publish
else
  bench/.venv/bin/python bench/report.py "$OUT"
fi
