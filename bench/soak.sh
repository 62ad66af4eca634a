#!/usr/bin/env bash
# Soak (not in CI): 10,000 concurrent kept-alive client connections (bench/soak.py, a request every ~20 s each:
# ~500 requests/s, every fifth a stream) for 30 minutes against a gateway of three simulated endpoints, while a
# fault script walks the primary and the secondary through errors, hangs, slowness, 429s, resets and flapping
# and back. Samples the gateway's RSS and open descriptors every 30 s; at the end prints what clients got and
# whether memory and descriptors stayed flat. Writes bench/out-soak/ and bench/results/soak.json.
#
# Usage: bench/soak.sh [--minutes N] [--connections N] [--every S]
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=30; CONNS=10000; EVERY=20
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --every) EVERY=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((CONNS + 1000)) ] || { echo "need an open-files limit above $((CONNS + 1000)) (client and gateway each)" >&2; exit 2; }
cargo build --release --locked --bin sheepdog
BIN=target/release/sheepdog
OUT=bench/out-soak; rm -rf "$OUT"; mkdir -p "$OUT" bench/results
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
for m in a:18301 b:18302 c:18303; do
  "$BIN" mock --listen "127.0.0.1:${m##*:}" --name "${m%%:*}" --models gpt-4.1 --tokens-per-sec 200 \
    > "$OUT/mock-${m%%:*}.log" 2>&1 & PIDS+=($!)
done
{
  printf '[server]\nlisten = "127.0.0.1:18300"\n[health]\ninterval = "2s"\n[log]\npath = "%s/soak.db"\n' "$PWD/$OUT"
  printf '[retry]\nmax_attempts = 3\ndeadline = "20s"\n'
  for m in a:18301:0 b:18302:1 c:18303:2; do
    IFS=: read -r n port prio <<< "$m"
    printf '[[endpoints]]\nname = "%s"\nbase_url = "http://127.0.0.1:%s/v1"\npriority = %s\nfirst_byte_timeout = "2s"\ntimeout = "10s"\nmodels = ["gpt-4.1"]\n' "$n" "$port" "$prio"
  done
  printf '[[models]]\nname = "gpt-4.1"\nstrategy = "priority"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n'
} > "$OUT/sheepdog.toml"
"$BIN" serve --config "$OUT/sheepdog.toml" > "$OUT/sheepdog.log" 2>&1 & GW=$!; PIDS+=($GW)
for _ in $(seq 1 100); do curl -sf -o /dev/null http://127.0.0.1:18300/health && break; sleep 0.1; done

# The fault script: one step a minute, over and over, on the primary (a) and now and then the secondary (b).
fault() { curl -s -o /dev/null -X POST "http://127.0.0.1:$1/_mock/faults" -d "$2"; }
(
  steps=('18301 {"mode":"error_500"}' '18301 {"mode":"ok"}' '18301 {"mode":"hang"}' '18301 {"mode":"ok"}'
         '18301 {"mode":"slow","latency_ms":3000}' '18301 {"mode":"ok"}' '18301 {"mode":"error_429"}'
         '18302 {"mode":"reset"}' '18301 {"mode":"ok"}' '18302 {"mode":"ok"}'
         '18301 {"mode":"error_500","error_rate":0.5}' '18301 {"mode":"ok","error_rate":0}')
  while true; do
    for s in "${steps[@]}"; do fault ${s%% *} "${s#* }"; echo "$(date +%T) $s" >> "$OUT/faults.log"; sleep 60; done
  done
) & PIDS+=($!)

python3 bench/soak.py --port 18300 --pid "$GW" --connections "$CONNS" --every "$EVERY" \
  --seconds $((MINUTES * 60)) > bench/results/soak.json
curl -s http://127.0.0.1:18300/metrics | grep -E '^sheepdog_(connections_open|requests_in_flight|request_log_dropped_total) ' \
  > "$OUT/metrics-end.txt" || true
python3 - bench/results/soak.json <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
s = j["samples"]
warm = [x for x in s if x["t_s"] >= 120 and not x.get("after_clients_closed")]
first, last, closed = warm[0], warm[-1], s[-1]
peak = max(x["rss_kb"] for x in s)
st = j["stats"]
answers = sum(st["status"].values())
ok = st["status"].get("200", 0)
print(f"soak: {j['connections']} connections, {j['seconds'] / 60:.0f} min, {answers} answers, "
      f"{ok / max(answers, 1):.4%} 200, statuses {st['status']}, client errors {st['errors']}, reconnects {st['connects'] - j['connections']}")
print(f"RSS MB at 2 min {first['rss_kb'] / 1024:.1f}, at the end {last['rss_kb'] / 1024:.1f} "
      f"({last['rss_kb'] / first['rss_kb']:.2f}x), peak {peak / 1024:.1f}, after the clients left {closed['rss_kb'] / 1024:.1f}")
print(f"descriptors at 2 min {first['fds']}, at the end {last['fds']}, after the clients left {closed['fds']}")
PY
cat "$OUT/metrics-end.txt"
