#!/usr/bin/env bash
# Connection flood (not in CI): rounds of 18,000 idle client connections against a gateway limited to 4,096
# file descriptors, while a kept-alive client and a fresh-connection client keep sending requests. Compares
# glibc malloc with heap trimming (the default), glibc without it (SHEEPDOG_NO_TRIM=1), and mimalloc
# (`--features mimalloc`). Writes bench/results/flood.json; prints one line per variant.
#
# Usage: bench/flood.sh [--rounds N] [--connections N] [--variants "glibc-trim glibc-no-trim mimalloc"]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=3; CONNS=18000; VARIANTS="glibc-trim glibc-no-trim mimalloc"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --variants) VARIANTS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((CONNS + 100)) ] || { echo "need an open-files limit above $((CONNS + 100)) for the flood client" >&2; exit 2; }
cargo build --release --locked --bin sheepdog
cargo build --release --locked --bin sheepdog --features mimalloc --target-dir target/mimalloc
OUT=bench/out-flood; rm -rf "$OUT"; mkdir -p "$OUT" bench/results
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
target/release/sheepdog mock --listen 127.0.0.1:18291 --name a --models gpt-4.1 --tokens-per-sec 0 > "$OUT/mock-a.log" 2>&1 & PIDS+=($!)
target/release/sheepdog mock --listen 127.0.0.1:18292 --name b --models claude-sonnet-4.5 --tokens-per-sec 0 > "$OUT/mock-b.log" 2>&1 & PIDS+=($!)
cat > "$OUT/sheepdog.toml" <<TOML
[server]
listen = "127.0.0.1:18290"
[health]
interval = "1h"
idle_interval = "1h"
[log]
path = "flood.db"
[[endpoints]]
name = "a"
base_url = "http://127.0.0.1:18291/v1"
models = ["gpt-4.1"]
[[endpoints]]
name = "b"
base_url = "http://127.0.0.1:18292/v1"
models = ["claude-sonnet-4.5"]
[[models]]
name = "gpt-4.1"
input_usd_per_mtok = 2.0
output_usd_per_mtok = 8.0
[[models]]
name = "claude-sonnet-4.5"
input_usd_per_mtok = 3.0
output_usd_per_mtok = 15.0
TOML
results=()
for variant in $VARIANTS; do
  bin=target/release/sheepdog; env=()
  [ "$variant" = glibc-no-trim ] && env=(SHEEPDOG_NO_TRIM=1)
  [ "$variant" = mimalloc ] && bin=target/mimalloc/release/sheepdog
  rm -f "$OUT"/flood.db*
  env "${env[@]}" prlimit --nofile=4096:4096 "$bin" serve --config "$OUT/sheepdog.toml" > "$OUT/$variant.log" 2>&1 &
  gw=$!; PIDS+=($gw)
  for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18290/health && break; sleep 0.1; done
  r=$(python3 bench/flood.py --port 18290 --pid "$gw" --connections "$CONNS" --rounds "$ROUNDS")
  kill "$gw"; wait "$gw" 2>/dev/null || true
  echo "$variant $r"
  results+=("\"$variant\": $r")
done
(IFS=,; echo "{${results[*]}}") > "bench/results/flood-${VARIANTS// /-}.json"
