//! The built-in web dashboard: one self-contained HTML page that polls `/status` and `/metrics`.
//!
//! Static content only; all data comes from the JSON routes, so the page cannot drift from them.

/// The page served at `GET /dashboard`.
pub const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sheepdog</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:2rem;background:#f7f7f5;color:#222}
h1{font-size:1.4rem;margin:0 0 .3rem} .sub{color:#666;margin-bottom:1.2rem}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px #0001}
th,td{padding:.45rem .7rem;border-bottom:1px solid #eee;text-align:left} th{background:#fafafa;font-weight:600}
.pill{display:inline-block;padding:.1rem .55rem;border-radius:1rem;font-size:.8rem;color:#fff}
.healthy,.closed{background:#2e8b57}.degraded,.half_open{background:#d99a00}.unhealthy,.open{background:#c0392b}.unknown{background:#888}
#global{font-weight:600} .bad{color:#c0392b}
</style></head><body>
<h1>sheepdog</h1><div class="sub">Live health of every endpoint and model &middot; refreshes every 2 s &middot;
<a href="/status">/status</a> &middot; <a href="/metrics">/metrics</a></div>
<p id="global">loading…</p>
<table><thead><tr><th>Endpoint</th><th>Model</th><th>Status</th><th>Breaker</th><th>Latency (mean / p95)</th>
<th>Success rate</th><th>Checks</th><th>In flight</th></tr></thead><tbody id="rows"></tbody></table>
<script>
function fmt(v,d){return v==null?"–":v.toFixed(d)}
function esc(s){return String(s).replace(/[&<>"']/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]))}
async function refresh(){
  try{
    const s=await (await fetch("/status",{cache:"no-store"})).json();
    const g=document.getElementById("global");
    g.textContent="Available: "+(s.global.available_ratio*100).toFixed(0)+"% of endpoint/model pairs"+(s.global.degraded?" — DEGRADED":"");
    g.className=s.global.degraded?"bad":"";
    const rows=[];
    for(const e of s.endpoints){for(const m of e.models){
      rows.push("<tr><td>"+esc(e.name)+(e.enabled?"":" (disabled)")+"</td><td>"+esc(m.model)+"</td><td><span class='pill "+m.status+"'>"+m.status+
      "</span></td><td><span class='pill "+m.breaker+"'>"+m.breaker.replace("_","-")+"</span></td><td>"+fmt(m.latency_ms,0)+" / "+fmt(m.p95_ms,0)+
      " ms</td><td>"+(m.success_rate==null?"–":(m.success_rate*100).toFixed(1)+"%")+"</td><td>"+m.checks+"</td><td>"+m.in_flight+
      (m.unanswered>=8?" <span class='pill degraded'>stalled?</span>":"")+"</td></tr>");
    }}
    document.getElementById("rows").innerHTML=rows.join("");
  }catch(err){document.getElementById("global").textContent="gateway unreachable: "+err}
}
refresh();setInterval(refresh,2000);
</script></body></html>
"#;
