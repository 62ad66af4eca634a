#!/usr/bin/env bash
# Side-by-side overhead benchmark: the same loads straight to nginx, through sheepdog, and through LiteLLM.
# Usage: bench/run.sh [--quick]      (--quick: 5 s per run instead of 30 s; LiteLLM skipped with --no-litellm)
# Installs what it needs (nginx from Debian, oha from crates.io, LiteLLM and matplotlib into bench/.venv).
# Writes bench/out/results.json and bench/out/overhead.png; bench/report.py prints the Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=30s; LITELLM=1
for a in "$@"; do
  case "$a" in
    --quick) DUR=5s ;;
    --no-litellm) LITELLM=0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
OUT=bench/out; mkdir -p "$OUT"

command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; }
command -v oha >/dev/null || cargo install oha --locked
if [ ! -x bench/.venv/bin/python ]; then python3 -m venv bench/.venv; fi
bench/.venv/bin/python -c 'import matplotlib' 2>/dev/null || bench/.venv/bin/pip install -q matplotlib
if [ "$LITELLM" = 1 ]; then
  bench/.venv/bin/python -c 'import litellm' 2>/dev/null || bench/.venv/bin/pip install -q 'litellm[proxy]'
fi
cargo build --release --locked

BODY='{"id":"chatcmpl-bench","object":"chat.completion","created":1735689600,"model":"gpt-4.1","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a fixed answer from nginx for benchmarks."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":12,"total_tokens":262}}'
MODELS='{"object":"list","data":[{"id":"gpt-4.1","object":"model","created":1735689600,"owned_by":"bench"}]}'
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
mkdir -p "$OUT/nginx-tmp"
cat > "$OUT/sheepdog.toml" <<TOML
[server]
listen = "127.0.0.1:18080"
[health]
interval = "5s"
idle_interval = "30s"
[[endpoints]]
name = "a"
base_url = "http://127.0.0.1:18081/v1"
api_keys = ["sk-bench-a"]
models = ["gpt-4.1"]
[[endpoints]]
name = "b"
base_url = "http://127.0.0.1:18082/v1"
api_keys = ["sk-bench-b"]
models = ["gpt-4.1"]
[[endpoints]]
name = "c"
base_url = "http://127.0.0.1:18083/v1"
api_keys = ["sk-bench-c"]
models = ["gpt-4.1"]
[[models]]
name = "gpt-4.1"
input_usd_per_mtok = 2.0
output_usd_per_mtok = 8.0
TOML
cat > "$OUT/litellm.yaml" <<YAML
model_list:
  - model_name: gpt-4.1
    litellm_params: {model: openai/gpt-4.1, api_base: "http://127.0.0.1:18081/v1", api_key: sk-bench}
YAML
# A ~1 KB request body.
python3 - > "$OUT/request.json" <<'PY'
import json
print(json.dumps({"model": "gpt-4.1", "max_tokens": 64, "messages": [
    {"role": "system", "content": "You are a helpful assistant. " * 8},
    {"role": "user", "content": "Summarise the following text in one sentence: " + "lorem ipsum dolor sit amet " * 22}]}))
PY

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
taskset -c 0 nginx -c "$PWD/$OUT/nginx.conf" & PIDS+=($!)
taskset -c 0 target/release/sheepdog serve --config "$OUT/sheepdog.toml" > "$OUT/sheepdog.log" 2>&1 & PIDS+=($!)
if [ "$LITELLM" = 1 ]; then
  LITELLM_MASTER_KEY=sk-litellm-bench LITELLM_LOCAL_MODEL_COST_MAP=True taskset -c 0 \
    bench/.venv/bin/litellm --config "$OUT/litellm.yaml" --port 18090 --num_workers 1 > "$OUT/litellm.log" 2>&1 & PIDS+=($!)
fi
wait_for() { for _ in $(seq 1 120); do curl -s -o /dev/null "$1" && return 0; sleep 0.5; done; echo "no answer from $1" >&2; exit 1; }
wait_for http://127.0.0.1:18081/v1/models
wait_for http://127.0.0.1:18080/health
[ "$LITELLM" = 1 ] && wait_for http://127.0.0.1:18090/health/liveliness

# oha on the other core; -q holds the rate, --latency-correction avoids coordinated omission.
load() { # name url rate(0 = max) extra-header...
  local name=$1 url=$2 rate=$3; shift 3
  local q=(); [ "$rate" != 0 ] && q=(-q "$rate" --latency-correction)
  taskset -c 1 oha -z "$DUR" -c 64 "${q[@]}" --no-tui --output-format json -m POST \
    -H 'content-type: application/json' "$@" -D "$OUT/request.json" "$url" > "$OUT/$name-$rate.json"
  echo "$name @ $rate: $(python3 -c "import json;d=json.load(open('$OUT/$name-$rate.json'));print(round(d['summary']['requestsPerSec']), 'req/s, p50', round(d['latencyPercentiles']['p50']*1000,3), 'ms, p99', round(d['latencyPercentiles']['p99']*1000,3), 'ms')")"
}
D=http://127.0.0.1:18081/v1/chat/completions
S=http://127.0.0.1:18080/v1/chat/completions
L=http://127.0.0.1:18090/v1/chat/completions
for rate in 1000 3000; do
  load direct "$D" "$rate"
  load sheepdog "$S" "$rate"
done
load direct "$D" 0
load sheepdog "$S" 0
if [ "$LITELLM" = 1 ]; then
  for rate in 20 1000; do
    load direct "$D" "$rate"
    load sheepdog "$S" "$rate"
    load litellm "$L" "$rate" -H 'authorization: Bearer sk-litellm-bench'
  done
fi
ps -o rss= -p "${PIDS[1]}" > "$OUT/sheepdog-rss-kb.txt"
{ echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"; echo "cpu: $(lscpu | sed -n 's/Model name: *//p') x $(nproc)";
  echo "sheepdog: $(git rev-parse --short HEAD)"; echo "oha: $(oha --version)"; echo "nginx: $(nginx -v 2>&1)";
  [ "$LITELLM" = 1 ] && echo "litellm: $(bench/.venv/bin/pip show litellm | sed -n 's/Version: //p')";
  echo "command: bench/run.sh $*"; echo "duration per run: $DUR"; } > "$OUT/meta.txt"
bench/.venv/bin/python bench/report.py "$OUT"
