#!/usr/bin/env python3
"""Soak client (bench/soak.sh starts the gateway, the mocks and the faults): N concurrent kept-alive client
connections, each sending a chat request (every fifth one a stream) every `--every` seconds, for `--seconds`.
Every `--sample` seconds it records the gateway's RSS, open file descriptors and its own counts; at the end it
prints one JSON object. A connection the gateway closed is reopened (and counted)."""

import argparse
import asyncio
import json
import os
import random
import time

BODY = json.dumps({"model": "gpt-4.1", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "soak " * 40}]}).encode()
STREAM = json.dumps({"model": "gpt-4.1", "max_tokens": 16, "stream": True,
                     "messages": [{"role": "user", "content": "soak " * 40}]}).encode()


def request(body):
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


REQ, SREQ = request(BODY), request(STREAM)


def proc(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def read_response(r):
    head = await r.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await r.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await r.readexactly(size + 2)
            if size == 0:
                break
    else:
        n = 0
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                n = int(line.split(b":")[1])
        await r.readexactly(n)
    return status, b"connection: close" in lower


async def client(i, a, stats, end):
    await asyncio.sleep(random.random() * a.every)
    r = w = None
    n = 0
    while time.monotonic() < end:
        try:
            if w is None:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", a.port), 10)
                stats["connects"] += 1
            n += 1
            w.write(SREQ if n % 5 == 0 else REQ)
            status, close = await asyncio.wait_for(read_response(r), 30)
            stats["status"][str(status)] = stats["status"].get(str(status), 0) + 1
            if close:
                w.close()
                w = None
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            k = type(e).__name__
            stats["errors"][k] = stats["errors"].get(k, 0) + 1
            if w is not None:
                w.close()
            w = None
        await asyncio.sleep(a.every * (0.5 + random.random()))
    if w is not None:
        w.close()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--connections", type=int, default=10000)
    p.add_argument("--every", type=float, default=20.0)
    p.add_argument("--seconds", type=float, default=1800.0)
    p.add_argument("--sample", type=float, default=30.0)
    a = p.parse_args()
    stats = {"connects": 0, "status": {}, "errors": {}}
    start = time.monotonic()
    end = start + a.seconds
    samples = []
    tasks = [asyncio.create_task(client(i, a, stats, end)) for i in range(a.connections)]
    while time.monotonic() < end:
        rss, fds = proc(a.pid)
        samples.append({"t_s": round(time.monotonic() - start), "rss_kb": rss, "fds": fds,
                        "answers": sum(stats["status"].values())})
        await asyncio.sleep(a.sample)
    await asyncio.gather(*tasks)
    await asyncio.sleep(5)
    rss, fds = proc(a.pid)
    samples.append({"t_s": round(time.monotonic() - start), "rss_kb": rss, "fds": fds,
                    "answers": sum(stats["status"].values()), "after_clients_closed": True})
    print(json.dumps({"connections": a.connections, "seconds": a.seconds, "stats": stats, "samples": samples}))


if __name__ == "__main__":
    asyncio.run(main())
