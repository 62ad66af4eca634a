#!/usr/bin/env python3
"""Connection flood against a running gateway (bench/flood.sh starts it): rounds of N idle TCP connections,
while a kept-alive client sends a request every 50 ms and a second client opens a fresh connection for each
request every 500 ms. Prints one JSON object: RSS (baseline, peak, after each round, one minute after the
last), what both clients got, the first request to an upstream never used before (it needs a new upstream
connection in the middle of the flood), and the gateway's own connection counters."""

import argparse
import http.client
import json
import socket
import threading
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metric(port, name):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/metrics")
        for line in c.getresponse().read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    except OSError:
        return None
    finally:
        c.close()
    return 0.0


BODY = json.dumps({"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]})


class Client(threading.Thread):
    """Requests every `every` seconds, on one kept-alive connection or a fresh connection each time."""

    def __init__(self, port, every, fresh, model="gpt-4.1"):
        super().__init__(daemon=True)
        self.port, self.every, self.fresh, self.model = port, every, fresh, model
        self.ok, self.failed, self.latencies, self.stop = 0, 0, [], False
        self.errors = {}

    def run(self):
        conn = None
        body = BODY.replace("gpt-4.1", self.model)
        while not self.stop:
            t = time.monotonic()
            try:
                if conn is None or self.fresh:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    self.ok += 1
                    self.latencies.append(time.monotonic() - t)
                else:
                    self.failed += 1
                    self.errors[str(r.status)] = self.errors.get(str(r.status), 0) + 1
                if self.fresh:
                    conn.close()
            except OSError as e:
                self.failed += 1
                self.errors[type(e).__name__] = self.errors.get(type(e).__name__, 0) + 1
                conn = None
            time.sleep(max(0.0, self.every - (time.monotonic() - t)))

    def summary(self):
        lat = sorted(self.latencies)
        p = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else None
        return {"ok": self.ok, "failed": self.failed, "errors": self.errors, "p50_ms": p(0.5), "p99_ms": p(0.99),
                "max_ms": round(lat[-1] * 1000, 2) if lat else None}


def flood(port, n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--connections", type=int, default=18000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hold", type=float, default=15.0)
    ap.add_argument("--settle", type=float, default=50.0, help="seconds after the last round's first 10 s")
    a = ap.parse_args()

    warm = Client(a.port, 0.0, False)
    warm.start()
    time.sleep(3)
    warm.stop = True
    warm.join()
    time.sleep(1)
    out = {"connections": a.connections, "rounds": a.rounds, "hold_s": a.hold, "baseline_rss_mb": rss_kb(a.pid) / 1024}
    kept, fresh = Client(a.port, 0.05, False), Client(a.port, 0.5, True)
    kept.start()
    fresh.start()
    peak, rounds = 0, []
    # A client connection opened before the flood, for the first request to an upstream never used.
    spare = http.client.HTTPConnection("127.0.0.1", a.port, timeout=60)
    spare.connect()
    for i in range(a.rounds):
        socks = flood(a.port, a.connections)
        started = time.monotonic()
        new_upstream = None
        if i == 0:
            # The first request to a model on an upstream never used: it needs a new upstream connection while
            # the flood holds the gateway's client connections.
            t = time.monotonic()
            try:
                spare.request("POST", "/v1/chat/completions", BODY.replace("gpt-4.1", "claude-sonnet-4.5"),
                              {"content-type": "application/json"})
                r = spare.getresponse()
                r.read()
                status = r.status
            except OSError as e:
                status = type(e).__name__
            new_upstream = {"status": status, "ms": round((time.monotonic() - t) * 1000, 1)}
        while time.monotonic() - started < a.hold:
            peak = max(peak, rss_kb(a.pid))
            time.sleep(0.5)
        for s in socks:
            s.close()
        time.sleep(10)
        rounds.append({"opened": len(socks), "rss_after_10s_mb": rss_kb(a.pid) / 1024, "new_upstream_request": new_upstream})
    time.sleep(a.settle)
    kept.stop = fresh.stop = True
    kept.join()
    fresh.join()
    out.update({
        "peak_rss_mb": peak / 1024,
        "rounds_detail": rounds,
        "rss_60s_after_mb": rss_kb(a.pid) / 1024,
        "kept_alive_client": kept.summary(),
        "fresh_connection_client": fresh.summary(),
        "rejected_total": metric(a.port, "sheepdog_connections_rejected_total"),
        "accept_errors_total": metric(a.port, "sheepdog_accept_errors_total"),
    })
    out["rss_60s_after_ratio"] = round(out["rss_60s_after_mb"] / out["baseline_rss_mb"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
