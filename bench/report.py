"""Turn bench/out/*.json (oha output) into a Markdown table and a PNG chart of added latency.

Usage: python bench/report.py bench/out
Added latency = gateway minus direct, percentile by percentile, for runs at the same rate in the same session.
"""
import glob
import json
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "bench/out"
runs = {}
for path in glob.glob(os.path.join(out, "*-*.json")):
    name, rate = os.path.basename(path)[:-5].rsplit("-", 1)
    if not rate.isdigit():
        continue
    with open(path) as f:
        d = json.load(f)
    lp = d["latencyPercentiles"]
    codes = d.get("statusCodeDistribution", {})
    ok = codes.get("200", 0)
    total = sum(codes.values()) or 1
    runs[(name, int(rate))] = {
        "rps": d["summary"]["requestsPerSec"],
        "p50": lp["p50"] * 1000,
        "p99": lp["p99"] * 1000,
        "p999": (lp.get("p99.9") or lp["p99"]) * 1000,
        "ok": ok / total,
    }

lines = ["| gateway | rate (req/s) | achieved | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms | 200s |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
added = {}
for (name, rate) in sorted(runs, key=lambda k: (k[1] == 0, k[1], k[0] != "direct", k[0])):
    r = runs[(name, rate)]
    d = runs.get(("direct", rate))
    a50 = a99 = ""
    if d and name != "direct":
        a50, a99 = r["p50"] - d["p50"], r["p99"] - d["p99"]
        added[(name, rate)] = (a50, a99)
        a50, a99 = f"{a50:+.3f}", f"{a99:+.3f}"
    label = "max" if rate == 0 else str(rate)
    lines.append(f"| {name} | {label} | {r['rps']:.0f} | {r['p50']:.3f} | {r['p99']:.3f} | {r['p999']:.3f} | {a50} | {a99} "
                 f"| {r['ok'] * 100:.1f} % |")
if ("direct", 0) in runs and ("sheepdog", 0) in runs:
    share = runs[("sheepdog", 0)]["rps"] / runs[("direct", 0)]["rps"]
    lines.append("")
    lines.append(f"Max throughput through sheepdog: {share * 100:.0f} % of direct.")
for rate in sorted({r for (_, r) in added}):
    s, l = added.get(("sheepdog", rate)), added.get(("litellm", rate))
    if s and l and s[1] > 0:
        lines.append(f"At {rate} req/s, LiteLLM's added p99 is {l[1] / s[1]:.0f}x sheepdog's.")
rss = os.path.join(out, "sheepdog-rss-kb.txt")
if os.path.exists(rss):
    lines.append(f"sheepdog RSS after the runs: {int(open(rss).read().strip() or 0) / 1024:.1f} MB.")
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
fig, ax = plt.subplots(figsize=(8, 4))
labels, p50s, p99s = [], [], []
for (name, rate), (a50, a99) in sorted(added.items(), key=lambda kv: (kv[0][1] == 0, kv[0][1], kv[0][0])):
    labels.append(f"{name}\n{'max' if rate == 0 else rate}/s")
    p50s.append(a50)
    p99s.append(a99)
xs = range(len(labels))
ax.bar([x - 0.2 for x in xs], p50s, width=0.4, label="added p50")
ax.bar([x + 0.2 for x in xs], p99s, width=0.4, label="added p99")
ax.set_xticks(list(xs))
ax.set_xticklabels(labels, fontsize=8)
ax.set_ylabel("added latency over direct (ms)")
ax.set_yscale("symlog", linthresh=0.1)
ax.set_title("Latency added by the gateway (lower is better)")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(out, "overhead.png"), dpi=120)
