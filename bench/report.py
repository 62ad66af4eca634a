"""Turn bench/out (oha and loadgen JSON written by bench/run.sh) into Markdown tables and a PNG chart.

Usage: python bench/report.py bench/out [--publish]
Added latency = gateway minus direct, percentile by percentile, taken per repetition (the direct run and the gateway
run of one repetition were adjacent in time) and then the median over the 3 repetitions.
--publish replaces the block between the bench markers in BENCHMARKS.md with the tables and copies the chart to
bench/results/overhead.png.
"""
import glob
import json
import os
import shutil
import statistics
import sys

args = [a for a in sys.argv[1:] if not a.startswith("--")]
PUBLISH = "--publish" in sys.argv[1:]
out = args[0] if args else "bench/out"
GATEWAYS = ["sheepdog", "nginx-proxy", "litellm"]
runs = {}  # (target, rate) -> [rep dicts in rep order]
for path in sorted(glob.glob(os.path.join(out, "runs", "*-*-*.json"))):
    base = os.path.basename(path)[:-5]
    if base.startswith("stream") or base.startswith("fault-"):
        continue
    target, rate, rep = base.rsplit("-", 2)
    with open(path) as f:
        d = json.load(f)
    lp = d["latencyPercentiles"]
    codes = d.get("statusCodeDistribution", {})
    n = sum(codes.values())
    cpu = None
    if os.path.exists(path + ".cpu") and n:
        ticks = int(open(path + ".cpu").read().strip() or 0)
        cpu = ticks / os.sysconf("SC_CLK_TCK") / n * 1e6
    runs.setdefault((target, int(rate)), []).append({
        "rep": int(rep),
        "rps": d["summary"]["requestsPerSec"],
        "p50": lp["p50"] * 1000,
        "p99": lp["p99"] * 1000,
        "p999": (lp.get("p99.9") or lp["p99"]) * 1000,
        "ok": codes.get("200", 0) / (n or 1),
        "cpu_us": cpu,
    })


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def added(target, rate, key):
    """Median over repetitions of (gateway - direct) for one percentile."""
    g, d = runs.get((target, rate)), runs.get(("direct", rate))
    if not g or not d:
        return None
    dd = {r["rep"]: r for r in d}
    return med([r[key] - dd[r["rep"]][key] for r in g if r["rep"] in dd])


def fmt(x, spec=".3f", plus=False):
    if x is None:
        return "–"
    return f"{x:+{spec}}" if plus else f"{x:{spec}}"


lines = ["### Fixed rates (non-streaming, ~1 KB request)", "",
         "| rate (req/s) | target | achieved req/s | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms | 200s |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
rates = sorted({r for (_, r) in runs if r != 0})
for rate in rates:
    for t in ["direct"] + GATEWAYS:
        rs = runs.get((t, rate))
        if not rs:
            continue
        a50 = added(t, rate, "p50") if t != "direct" else None
        a99 = added(t, rate, "p99") if t != "direct" else None
        lines.append(f"| {rate} | {t} | {med([r['rps'] for r in rs]):.0f} | {fmt(med([r['p50'] for r in rs]))} "
                     f"| {fmt(med([r['p99'] for r in rs]))} | {fmt(med([r['p999'] for r in rs]))} "
                     f"| {fmt(a50, plus=True)} | {fmt(a99, plus=True)} | {min(r['ok'] for r in rs) * 100:.1f} % |")

lines += ["", "### Maximum throughput (64 connections, as fast as the target answers)", "",
          "| target | req/s | share of direct | p50 ms | p99 ms | gateway CPU per request |",
          "| --- | --- | --- | --- | --- | --- |"]
direct_max = med([r["rps"] for r in runs.get(("direct", 0), [])])
for t in ["direct"] + GATEWAYS:
    rs = runs.get((t, 0))
    if not rs:
        continue
    rps = med([r["rps"] for r in rs])
    share = f"{rps / direct_max * 100:.0f} %" if direct_max else "–"
    cpu = med([r["cpu_us"] for r in rs])
    lines.append(f"| {t} | {rps:.0f} | {share} | {fmt(med([r['p50'] for r in rs]))} | {fmt(med([r['p99'] for r in rs]))} "
                 f"| {fmt(cpu, '.1f') + ' µs' if cpu else '–'} |")

streams, cold = {}, {}
reps = {}  # target -> [stream reports]
for path in sorted(glob.glob(os.path.join(out, "runs", "stream-*.json"))):
    name = os.path.basename(path)[len("stream-"):-5]
    with open(path) as f:
        d = json.load(f)
    if name.startswith("cold-"):
        cold[name[len("cold-"):]] = d
    else:
        reps.setdefault(name.rsplit("-", 1)[0], []).append(d)


def median_report(rs):
    """One stream report whose numbers are the medians over repetitions (errors summed)."""
    m = {"streams": rs[0]["streams"], "ok": min(r["ok"] for r in rs), "errors": sum(r["errors"] for r in rs),
         "repetitions": len(rs)}
    for key in ("ttft_ms", "lateness_ms", "transit_ms"):
        if all(r.get(key) for r in rs):
            m[key] = {k: med([r[key][k] for r in rs]) for k in rs[0][key]}
    rss = [r.get("rss_kb_at_full_concurrency") for r in rs if r.get("rss_kb_at_full_concurrency")]
    if rss:
        m["rss_kb_at_full_concurrency"] = med(rss)
    return m


streams = {t: median_report(rs) for t, rs in reps.items()}


def chunk_delay(s):
    """Per-chunk delay figures of a stream run: transit (mock stamp to client) when stamped, else lateness."""
    return s.get("transit_ms") or s.get("lateness_ms") or {}


def added_chunk(t, key):
    s, d = streams.get(t), streams.get("direct")
    if not s or not d or t == "direct":
        return None
    a, b = chunk_delay(s).get(key), chunk_delay(d).get(key)
    return None if a is None or b is None else a - b


if streams:
    lines += ["", "### Streaming (1,000 concurrent streams x 200 chunks, 20 chunks/s each)", "",
              "Transit = from the moment the upstream wrote a chunk (its stamp) to the moment the client read it. "
              "Cold = the first burst of 1,000 streams (every stream needs a new upstream connection); "
              "the other columns are medians over the repetitions on warm connection pools (LiteLLM: one run).", "",
              "| target | streams ok | TTFT p50 cold ms | TTFT p50 ms | TTFT p99 ms | transit p50 ms | p99 ms | p99.9 ms "
              "| added per chunk p50 ms | p99 ms | RSS at 1,000 streams |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in ["direct"] + GATEWAYS:
        s = streams.get(t)
        if not s:
            continue
        tr, tt = chunk_delay(s), s.get("ttft_ms", {})
        note = "" if s.get("transit_ms") else " (lateness: no stamps)"
        ct = cold.get(t, {}).get("ttft_ms", {}).get("p50")
        rss = s.get("rss_kb_at_full_concurrency")
        lines.append(f"| {t}{note} | {s['ok']}/{s['streams']} | {fmt(ct)} | {fmt(tt.get('p50'))} | {fmt(tt.get('p99'))} "
                     f"| {fmt(tr.get('p50'))} | {fmt(tr.get('p99'))} | {fmt(tr.get('p999'))} "
                     f"| {fmt(added_chunk(t, 'p50'), plus=True)} | {fmt(added_chunk(t, 'p99'), plus=True)} "
                     f"| {f'{rss / 1024:.1f} MB' if rss else '–'} |")

faults = {}
for path in sorted(glob.glob(os.path.join(out, "runs", "fault-*.json"))):
    _, mode, target = os.path.basename(path)[:-5].split("-", 2)
    with open(path) as f:
        faults[(mode, target)] = json.load(f)
if faults:
    lines += ["", "### Failover under load (1,000 req/s for 20 s; one of three upstreams misbehaves from 5 s to 15 s)", "",
              "Upstreams: three `sheepdog mock` per gateway. sheepdog: breaker 3 failures / 30 s, `first_byte_timeout` "
              "2 s, `max_attempts` 3; *hedged*: the same with `hedge_after = \"100ms\"`. nginx: `proxy_next_upstream "
              "error timeout http_500 http_502 http_503 http_429 non_idempotent`, `max_fails=3 fail_timeout=30s`, "
              "2 s connect and read timeouts.", "",
              "*Cut off* counts requests still in flight when the 20 s load stopped (oha aborts them): not "
              "failures. p99 over the 20 s, fault or not.", "",
              "| fault | target | answered 200 | other answers | cut off | p50 ms | p99 ms | p99.9 ms | max ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in ("none", "error_500", "hang", "killed"):
        for t in ("sheepdog", "sheepdog-hedged", "nginx-failover"):
            d = faults.get((mode, t))
            if not d:
                continue
            codes = d.get("statusCodeDistribution", {})
            n = sum(codes.values())
            errs = d.get("errorDistribution", {})
            cut = sum(v for k, v in errs.items() if "deadline" in k)
            other = ", ".join([f"{k}: {v}" for k, v in sorted(codes.items()) if k != "200"] +
                              [f"{k}: {v}" for k, v in sorted(errs.items()) if "deadline" not in k]) or "none"
            lp = d["latencyPercentiles"]
            mx = d.get("summary", {}).get("slowest")
            lines.append(f"| {mode} | {t} | {codes.get('200', 0) / (n or 1) * 100:.2f} % of {n} | {other} | {cut} "
                         f"| {fmt(lp['p50'] * 1000)} | {fmt(lp['p99'] * 1000)} | {fmt((lp.get('p99.9') or 0) * 1000)} "
                         f"| {fmt(mx * 1000 if mx else None)} |")

# The targets of the performance issue, checked against this run.
checks = []
for rate in (1000, 3000):
    a50, a99 = added("sheepdog", rate, "p50"), added("sheepdog", rate, "p99")
    if a50 is not None:
        checks.append((f"added p50 at {rate} req/s <= 0.2 ms", a50 <= 0.2, f"{a50:+.3f} ms"))
        checks.append((f"added p99 at {rate} req/s <= 0.5 ms", a99 <= 0.5, f"{a99:+.3f} ms"))
s_max = med([r["rps"] for r in runs.get(("sheepdog", 0), [])])
if s_max and direct_max:
    checks.append(("max throughput >= 60 % of direct", s_max / direct_max >= 0.6, f"{s_max / direct_max * 100:.0f} %"))
    n_max = med([r["rps"] for r in runs.get(("nginx-proxy", 0), [])])
    if n_max:
        checks.append(("  (reference: nginx proxy_pass, same layout)", None, f"{n_max / direct_max * 100:.0f} %"))
for rate in rates:
    s99, l99 = added("sheepdog", rate, "p99"), added("litellm", rate, "p99")
    if s99 is not None and l99 is not None:
        ratio = l99 / max(s99, 0.001)
        checks.append((f"LiteLLM added p99 / sheepdog added p99 at {rate} req/s >= 50", ratio >= 50, f"{ratio:.0f}x"))
if "sheepdog" in streams and "direct" in streams:
    s = streams["sheepdog"]
    a = added_chunk("sheepdog", "p99")
    if a is not None:
        checks.append(("streaming per-chunk added p99 <= 0.1 ms", a <= 0.1, f"{a:+.3f} ms"))
    rss = s.get("rss_kb_at_full_concurrency")
    if rss:
        checks.append(("RSS at 1,000 streams <= 64 MB", rss / 1024 <= 64, f"{rss / 1024:.1f} MB"))
if checks:
    lines += ["", "### Targets, this run", "", "| target | met | this run |", "| --- | --- | --- |"]
    for name, ok, val in checks:
        lines.append(f"| {name} | {'–' if ok is None else ('yes' if ok else '**no**')} | {val} |")

meta = os.path.join(out, "meta.txt")
if os.path.exists(meta):
    lines += ["", "```", open(meta).read().strip(), "```"]
extra = os.path.join(out, "extra.md")
if os.path.exists(extra):
    lines += ["", open(extra).read().strip()]
table = "\n".join(lines)
print(table)
with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table + "\n")

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
fig, (ax1, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(17, 4.4), gridspec_kw={"width_ratios": [3, 2, 1.6, 1.8]})
colors = {"sheepdog": "#2b7bba", "nginx-proxy": "#7f7f7f", "litellm": "#d9534f", "sheepdog-hedged": "#6aa6d6",
          "nginx-failover": "#7f7f7f"}
groups = [r for r in rates]
width = 0.8 / (2 * len(GATEWAYS))
for gi, t in enumerate(GATEWAYS):
    for pi, key in enumerate(("p50", "p99")):
        xs, ys = [], []
        for i, rate in enumerate(groups):
            v = added(t, rate, key)
            if v is not None:
                xs.append(i + (gi * 2 + pi) * width - 0.4 + width / 2)
                ys.append(max(v, 0.001))
        if xs:
            ax1.bar(xs, ys, width=width, color=colors[t], alpha=1.0 if key == "p99" else 0.55,
                    label=f"{t} added {key}")
ax1.set_xticks(range(len(groups)))
ax1.set_xticklabels([f"{r} req/s" for r in groups])
ax1.set_yscale("log")
ax1.set_ylabel("added latency over direct (ms, log)")
ax1.set_title("Latency added over direct (lower is better)", fontsize=10)
ax1.legend(fontsize=7)


def bar_panel(ax, points, ylabel, title):
    """Log-scale bars, one per (target, label, value); colours by target."""
    ax.bar([p[1] for p in points], [p[2] for p in points], color=[colors.get(p[0], "#5cb85c") for p in points])
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)


bar_panel(ax2, [(t, t, v) for t in ["direct"] + GATEWAYS if (v := med([r["rps"] for r in runs.get((t, 0), [])]))],
          "requests/s (log)", "Maximum throughput (higher is better)")
bar_panel(ax3, [(t, t, rss / 1024) for t in GATEWAYS
                if (rss := streams.get(t, {}).get("rss_kb_at_full_concurrency"))],
          "MB (log)", "RSS, 1,000 open streams (lower is better)")
hung_labels = {"sheepdog": "sheepdog", "sheepdog-hedged": "sheepdog\nhedged", "nginx-failover": "nginx"}
bar_panel(ax4, [(t, hung_labels[t], faults[("hang", t)]["latencyPercentiles"]["p99"] * 1000)
                for t in hung_labels if ("hang", t) in faults],
          "p99 ms (log)", "p99, 1 of 3 upstreams hung (lower is better)")
fig.tight_layout()
fig.savefig(os.path.join(out, "overhead.png"), dpi=120)

if PUBLISH:
    os.makedirs("bench/results", exist_ok=True)
    shutil.copy(os.path.join(out, "overhead.png"), "bench/results/overhead.png")
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    doc = open("BENCHMARKS.md").read()
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        tail = rest.split(end, 1)[1]
        block = f"{begin}\n![added latency and throughput](bench/results/overhead.png)\n\n{table}\n{end}"
        open("BENCHMARKS.md", "w").write(head + block + tail)
        print("BENCHMARKS.md updated")
    else:
        print("BENCHMARKS.md has no bench markers: not updated", file=sys.stderr)
