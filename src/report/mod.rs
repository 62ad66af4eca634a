//! `sheepdog report`: statistics from the request log over a window — totals, per requested model, per
//! endpoint and served model, per client, and a timeline — as a table, JSON or CSV; the four charts of a
//! monthly cost review (`chart`: cost share, latency against the SLA and success rate by model, requests over
//! time); and, with `--project-tokens`, what a month of tokens would cost on each model and endpoint
//! (`projection`).
//!
//! [`aggregate`] is pure (entries, the time window and the SLA in, numbers out); [`run`] only reads the log
//! and writes the output. Knows nothing of the gateway's live state.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use sheepdog_policy::pricing::Nanos;
use sheepdog_policy::stats::{percentile, sort_finite};

use crate::log::Entry;

pub mod api;
pub mod chart;
mod charts;
pub mod projection;

pub use charts::charts;

/// The latency an answer should stay under unless `--sla-ms` says otherwise, ms.
pub const DEFAULT_SLA_MS: f64 = 2000.0;

/// What happened to the requests of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Requests answered.
    pub requests: u64,
    /// Answered with success (2xx, streams that ended well).
    pub ok: u64,
    /// Refused as the client's mistake (4xx but 429; 499: the client went away).
    pub client_errors: u64,
    /// Failed for the gateway or its upstreams (5xx, 429, streams that broke).
    pub failed: u64,
    /// `failed / requests`.
    pub error_rate: f64,
    /// Served after more than one upstream attempt.
    pub failovers: u64,
    /// Served by a fallback model (another than the one requested).
    pub fallbacks: u64,
    /// Mean latency of successful answers (arrival to last byte), ms.
    pub latency_mean_ms: Option<f64>,
    /// Latency of successful answers (arrival to last byte), ms.
    pub latency_p50_ms: Option<f64>,
    /// See `latency_p50_ms`.
    pub latency_p95_ms: Option<f64>,
    /// See `latency_p50_ms`.
    pub latency_p99_ms: Option<f64>,
    /// Time to first byte (first chunk of a stream) of successful answers, ms.
    pub ttft_p50_ms: Option<f64>,
    /// See `ttft_p50_ms`.
    pub ttft_p95_ms: Option<f64>,
    /// Successful answers slower than the report's SLA.
    pub over_sla: u64,
    /// Prompt tokens, as reported by the upstreams.
    pub prompt_tokens: u64,
    /// Of the prompt tokens, those the upstreams served from their prompt cache.
    pub cached_prompt_tokens: u64,
    /// Completion tokens, as reported by the upstreams.
    pub completion_tokens: u64,
    /// Cost from the pricing table, USD.
    pub cost_usd: f64,
    /// Requests whose tokens the gateway counted itself (the upstream did not report usage).
    pub estimated: u64,
}

/// Stats of one requested model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRow {
    /// The model clients asked for.
    pub model: String,
    /// Its numbers.
    #[serde(flatten)]
    pub stats: Stats,
}

/// Stats of one client (requests without a client key are not in a client row).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientRow {
    /// The client's configured name.
    pub client: String,
    /// Its numbers.
    #[serde(flatten)]
    pub stats: Stats,
}

/// Stats of one (endpoint, served model).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointRow {
    /// The endpoint that served.
    pub endpoint: String,
    /// The model it served.
    pub model: String,
    /// Its numbers.
    #[serde(flatten)]
    pub stats: Stats,
}

/// One time bucket of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    /// Start of the bucket, Unix ms.
    pub start_ms: i64,
    /// The requests that arrived in it.
    #[serde(flatten)]
    pub stats: Stats,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Window start, Unix ms.
    pub since_ms: i64,
    /// Window end (the time of the report), Unix ms.
    pub until_ms: i64,
    /// Width of the timeline buckets, ms.
    pub bucket_ms: i64,
    /// The latency successful answers are held against (`over_sla`), ms.
    pub sla_ms: f64,
    /// All requests of the window.
    pub total: Stats,
    /// Per requested model, most requests first.
    pub models: Vec<ModelRow>,
    /// Per endpoint and served model, most requests first.
    pub endpoints: Vec<EndpointRow>,
    /// Per client, most requests first.
    pub clients: Vec<ClientRow>,
    /// Oldest bucket first; every bucket of the window, empty ones included.
    pub timeline: Vec<Bucket>,
    /// What `--project-tokens` a month would cost (absent without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projection: Option<projection::Projection>,
}

/// How a logged request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    ClientError,
    Failed,
}

fn verdict(e: &Entry) -> Verdict {
    let broken = matches!(e.error.as_deref(), Some("stream_broken" | "stream_timeout"));
    match e.status {
        200..=399 if !broken => Verdict::Ok,
        200..=399 => Verdict::Failed,
        429 => Verdict::Failed,
        400..=499 => Verdict::ClientError,
        _ => Verdict::Failed,
    }
}

/// Accumulates [`Stats`]. Money is summed in exact nano-dollars (rows from before schema 2 carry only a float
/// cost, rounded to the nano-dollar once).
#[derive(Default)]
struct Acc {
    s: Stats,
    latencies: Vec<f64>,
    ttfts: Vec<f64>,
    cost: Nanos,
}

impl Acc {
    fn add(&mut self, e: &Entry) {
        let s = &mut self.s;
        s.requests += 1;
        match verdict(e) {
            Verdict::Ok => {
                s.ok += 1;
                self.latencies.push(e.duration_ms);
                if let Some(t) = e.ttft_ms {
                    self.ttfts.push(t);
                }
                if e.attempts > 1 {
                    s.failovers += 1;
                }
            }
            Verdict::ClientError => s.client_errors += 1,
            Verdict::Failed => s.failed += 1,
        }
        if e.served_model.as_deref().is_some_and(|m| m != e.model) && e.error.is_none() {
            s.fallbacks += 1;
        }
        s.prompt_tokens += e.prompt_tokens.unwrap_or(0);
        s.cached_prompt_tokens += e.cached_tokens.unwrap_or(0);
        s.completion_tokens += e.completion_tokens.unwrap_or(0);
        s.estimated += u64::from(e.estimated);
        let cost = e.cost_nanos.map(Nanos).or(e.cost_usd.map(Nanos::from_usd)).unwrap_or_default();
        self.cost = self.cost.saturating_add(cost);
    }

    fn finish(mut self, sla_ms: f64) -> Stats {
        sort_finite(&mut self.latencies);
        sort_finite(&mut self.ttfts);
        let mut s = self.s;
        s.cost_usd = self.cost.usd();
        s.latency_mean_ms =
            (!self.latencies.is_empty()).then(|| self.latencies.iter().sum::<f64>() / self.latencies.len() as f64);
        s.error_rate = if s.requests == 0 { 0.0 } else { s.failed as f64 / s.requests as f64 };
        s.latency_p50_ms = percentile(&self.latencies, 0.50);
        s.latency_p95_ms = percentile(&self.latencies, 0.95);
        s.latency_p99_ms = percentile(&self.latencies, 0.99);
        s.ttft_p50_ms = percentile(&self.ttfts, 0.50);
        s.ttft_p95_ms = percentile(&self.ttfts, 0.95);
        s.over_sla = self.latencies.iter().filter(|l| **l > sla_ms).count() as u64;
        s
    }
}

/// A bucket width for a window: about 60 buckets, rounded to a width people read easily.
pub fn bucket_ms(window_ms: i64) -> i64 {
    const WIDTHS: [i64; 12] = [
        1_000, 5_000, 10_000, 60_000, 300_000, 900_000, 1_800_000, 3_600_000, 10_800_000, 21_600_000, 43_200_000,
        86_400_000,
    ];
    let target = window_ms / 60;
    WIDTHS.iter().copied().find(|w| *w >= target).unwrap_or(86_400_000)
}

/// Aggregate `entries` (any order) of the window `[since_ms, until_ms)`, holding successful answers against
/// `sla_ms`; entries outside the window are ignored.
pub fn aggregate(entries: &[Entry], since_ms: i64, until_ms: i64, sla_ms: f64) -> Report {
    let until_ms = until_ms.max(since_ms + 1);
    let width = bucket_ms(until_ms - since_ms);
    let first = since_ms - since_ms.rem_euclid(width);
    let n_buckets = ((until_ms - 1 - first) / width + 1) as usize;
    let mut total = Acc::default();
    let mut models: BTreeMap<&str, Acc> = BTreeMap::new();
    let mut endpoints: BTreeMap<(&str, &str), Acc> = BTreeMap::new();
    let mut clients: BTreeMap<&str, Acc> = BTreeMap::new();
    let mut buckets: Vec<Acc> = (0..n_buckets).map(|_| Acc::default()).collect();
    for e in entries.iter().filter(|e| e.ts_ms >= since_ms && e.ts_ms < until_ms) {
        total.add(e);
        models.entry(&e.model).or_default().add(e);
        if let Some(c) = &e.client {
            clients.entry(c).or_default().add(e);
        }
        if let Some(ep) = &e.endpoint {
            let served = e.served_model.as_deref().unwrap_or(&e.model);
            endpoints.entry((ep, served)).or_default().add(e);
        }
        let i = ((e.ts_ms - first) / width) as usize;
        if let Some(b) = buckets.get_mut(i) {
            b.add(e);
        }
    }
    let mut models: Vec<ModelRow> =
        models.into_iter().map(|(m, a)| ModelRow { model: m.to_owned(), stats: a.finish(sla_ms) }).collect();
    models.sort_by_key(|m| std::cmp::Reverse(m.stats.requests));
    let mut endpoints: Vec<EndpointRow> = endpoints
        .into_iter()
        .map(|((e, m), a)| EndpointRow { endpoint: e.to_owned(), model: m.to_owned(), stats: a.finish(sla_ms) })
        .collect();
    endpoints.sort_by_key(|e| std::cmp::Reverse(e.stats.requests));
    let mut clients: Vec<ClientRow> =
        clients.into_iter().map(|(c, a)| ClientRow { client: c.to_owned(), stats: a.finish(sla_ms) }).collect();
    clients.sort_by_key(|c| std::cmp::Reverse(c.stats.requests));
    let timeline = buckets
        .into_iter()
        .enumerate()
        .map(|(i, a)| Bucket { start_ms: first + i as i64 * width, stats: a.finish(sla_ms) })
        .collect();
    Report {
        since_ms,
        until_ms,
        bucket_ms: width,
        sla_ms,
        total: total.finish(sla_ms),
        models,
        endpoints,
        clients,
        timeline,
        projection: None,
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
}

fn stats_cells(s: &Stats) -> String {
    let over = if s.ok == 0 { "-".to_owned() } else { format!("{:.2}%", s.over_sla as f64 * 100.0 / s.ok as f64) };
    format!(
        "{:>9} {:>7.2}% {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>12} {:>11.4}",
        s.requests,
        s.error_rate * 100.0,
        s.failovers,
        ms(s.latency_p50_ms),
        ms(s.latency_p95_ms),
        ms(s.latency_p99_ms),
        over,
        ms(s.ttft_p50_ms),
        s.prompt_tokens,
        s.completion_tokens,
        s.cost_usd
    )
}

const STATS_HEAD: &str =
    "  REQUESTS  ERRORS% FAILOVERS    P50_MS    P95_MS    P99_MS  OVER_SLA   TTFT_MS  PROMPT_TOK  \
                          COMPLET_TOK    COST_USD";

/// A fixed-width text table.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "sheepdog report: {} to {}", rfc3339(r.since_ms), rfc3339(r.until_ms));
    let _ = writeln!(
        out,
        "{} requests: {} ok, {} client errors, {} failed; {} failovers, {} answered by a fallback model\n",
        r.total.requests, r.total.ok, r.total.client_errors, r.total.failed, r.total.failovers, r.total.fallbacks
    );
    let _ = writeln!(
        out,
        "Latencies are of successful answers; OVER_SLA is the share of them slower than {} ms.\n",
        r.sla_ms
    );
    let _ = writeln!(out, "{:<34}{STATS_HEAD}", "MODEL");
    let _ = writeln!(out, "{:<34}{}", "(all)", stats_cells(&r.total));
    for m in &r.models {
        let name = if m.model.is_empty() { "(none: invalid request)" } else { &m.model };
        let _ = writeln!(out, "{:<34}{}", name, stats_cells(&m.stats));
    }
    let _ = writeln!(out, "\n{:<34}{STATS_HEAD}", "ENDPOINT / SERVED MODEL");
    for e in &r.endpoints {
        let _ = writeln!(out, "{:<34}{}", format!("{}/{}", e.endpoint, e.model), stats_cells(&e.stats));
    }
    if let Some(p) = &r.projection {
        projection_table(&mut out, p);
    }
    out
}

fn projection_table(out: &mut String, p: &projection::Projection) {
    use chart::{thousands, usd};
    let source = match p.mix.source {
        "log" => "the mix of this window",
        _ => "no tokens in this window: an even split assumed",
    };
    let _ = writeln!(
        out,
        "\nWhat {} tokens a month would cost ({} prompt, {} of them cached, and {} completion: {source})",
        thousands(p.tokens),
        thousands(p.prompt_tokens),
        thousands(p.cached_prompt_tokens),
        thousands(p.completion_tokens)
    );
    let _ = writeln!(
        out,
        "{:<34}{:>10} {:>10} {:>10} {:>14}",
        "MODEL (list price)", "INPUT/M", "CACHED/M", "OUTPUT/M", "MONTHLY_USD"
    );
    for m in &p.models {
        let _ = writeln!(
            out,
            "{:<34}{:>10.4} {:>10.4} {:>10.4} {:>14}",
            m.model,
            m.input_usd_per_mtok,
            m.cached_input_usd_per_mtok,
            m.output_usd_per_mtok,
            usd(m.cost_usd)
        );
    }
    let _ = writeln!(out, "\n{:<34}{:>10} {:>36}", "ENDPOINT / MODEL", "MULTIPLIER", "MONTHLY_USD");
    for e in &p.endpoints {
        let name = format!("{}/{}", e.endpoint, e.model);
        let _ = writeln!(out, "{name:<34}{:>10.4} {:>36}", e.price_multiplier, usd(e.cost_usd));
    }
    if let Some(v) = p.at_current_mix_usd {
        let _ = writeln!(out, "\nAt this window's model mix and the prices actually paid: {} a month", usd(v));
    }
}

fn ms_duration(ms: i64) -> std::time::Duration {
    std::time::Duration::from_millis(ms.max(0) as u64)
}

/// Unix ms as `2026-11-22T08:15:00Z`.
fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + ms_duration(ms)).to_string()
}

/// CSV: one row for the total, one per model, one per endpoint and served model.
pub fn csv(r: &Report) -> String {
    let mut out = String::from(
        "scope,model,endpoint,requests,ok,client_errors,failed,error_rate,failovers,fallbacks,latency_p50_ms,\
         latency_p95_ms,latency_p99_ms,ttft_p50_ms,ttft_p95_ms,prompt_tokens,completion_tokens,cost_usd,over_sla,\
         cached_prompt_tokens\n",
    );
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_default();
    let mut row = |scope: &str, model: &str, endpoint: &str, s: &Stats| {
        let _ = writeln!(
            out,
            "{scope},{},{},{},{},{},{},{:.6},{},{},{},{},{},{},{},{},{},{:.8},{},{}",
            csv_field(model),
            csv_field(endpoint),
            s.requests,
            s.ok,
            s.client_errors,
            s.failed,
            s.error_rate,
            s.failovers,
            s.fallbacks,
            opt(s.latency_p50_ms),
            opt(s.latency_p95_ms),
            opt(s.latency_p99_ms),
            opt(s.ttft_p50_ms),
            opt(s.ttft_p95_ms),
            s.prompt_tokens,
            s.completion_tokens,
            s.cost_usd,
            s.over_sla,
            s.cached_prompt_tokens
        );
    };
    row("total", "", "", &r.total);
    for m in &r.models {
        row("model", &m.model, "", &m.stats);
    }
    for e in &r.endpoints {
        row("endpoint", &e.model, &e.endpoint, &e.stats);
    }
    // A projection's rows: the projected tokens in the token columns, the monthly cost in cost_usd.
    if let Some(p) = &r.projection {
        let mut projected = |scope: &str, model: &str, endpoint: &str, cost: f64| {
            let _ = writeln!(
                out,
                "{scope},{},{},,,,,,,,,,,,,{},{},{cost:.8},,{}",
                csv_field(model),
                csv_field(endpoint),
                p.prompt_tokens,
                p.completion_tokens,
                p.cached_prompt_tokens
            );
        };
        for m in &p.models {
            projected("projection_model", &m.model, "", m.cost_usd);
        }
        for e in &p.endpoints {
            projected("projection_endpoint", &e.model, &e.endpoint, e.cost_usd);
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Output format of `sheepdog report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text.
    Table,
    /// The whole report as JSON.
    Json,
    /// One line per group.
    Csv,
}

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The log file is missing or unreadable, or the database unreachable.
    #[error("cannot read the request log {0}: {1}")]
    Read(String, crate::log::ReadError),
    /// A chart could not be written.
    #[error("cannot write {0}: {1}")]
    Write(String, std::io::Error),
}

/// What `sheepdog report` was asked for, beyond where the log is.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// The window: requests that arrived this long ago or later.
    pub since: std::time::Duration,
    /// Table, JSON or CSV.
    pub format: Format,
    /// Write the charts into this directory.
    pub charts: Option<&'a Path>,
    /// The latency successful answers are held against, ms.
    pub sla_ms: f64,
    /// Project this many tokens a month on the pricing table of this config.
    pub project: Option<(u64, &'a crate::config::Config)>,
}

/// Read the log at `db`, aggregate the window ending now, and render it; charts go to `charts` if given.
pub fn run(db: &crate::log::Source, o: &Options<'_>) -> Result<String, ReportError> {
    let now_ms = crate::clock::unix_ms();
    let since_ms = now_ms - o.since.as_millis() as i64;
    let read_err = |e| ReportError::Read(db.to_string(), e);
    if let crate::log::Source::Sqlite(path) = db {
        if !path.exists() {
            return Err(read_err(rusqlite::Error::InvalidPath(path.clone()).into()));
        }
    }
    let entries = db.read_since(since_ms).map_err(read_err)?;
    let mut report = aggregate(&entries, since_ms, now_ms + 1, o.sla_ms);
    if let Some((tokens, config)) = o.project {
        report.projection = Some(projection::project(&report, config, tokens));
    }
    if let Some(dir) = o.charts {
        std::fs::create_dir_all(dir).map_err(|e| ReportError::Write(dir.display().to_string(), e))?;
        for (name, svg) in charts(&report) {
            let path = dir.join(name);
            std::fs::write(&path, svg).map_err(|e| ReportError::Write(path.display().to_string(), e))?;
        }
    }
    Ok(match o.format {
        Format::Table => table(&report),
        Format::Json => serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
        Format::Csv => csv(&report),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    const T0: i64 = 1_800_000_000_000;

    fn e(ts: i64, model: &str, endpoint: Option<&str>, status: u16, ms: f64) -> Entry {
        Entry {
            ts_ms: T0 + ts,
            model: model.into(),
            served_model: endpoint.map(|_| model.into()),
            endpoint: endpoint.map(Into::into),
            status,
            attempts: 1,
            duration_ms: ms,
            ttft_ms: Some(ms / 2.0),
            prompt_tokens: Some(10),
            completion_tokens: Some(20),
            cost_usd: Some(0.001),
            ..Entry::begin("chat")
        }
    }

    fn sample() -> Vec<Entry> {
        let mut v: Vec<Entry> = (0..100).map(|i| e(i * 1000, "gpt-4.1", Some("a"), 200, (i + 1) as f64)).collect();
        v.push(Entry { attempts: 2, ..e(5_000, "gpt-4.1", Some("b"), 200, 7.0) });
        v.push(Entry { served_model: Some("claude".into()), ..e(6_000, "gpt-4.1", Some("b"), 200, 8.0) });
        v.push(Entry { error: Some(Cow::Borrowed("no_upstream_available")), ..e(7_000, "gpt-4.1", None, 503, 3.0) });
        v.push(Entry { error: Some(Cow::Borrowed("stream_broken")), ..e(8_000, "gpt-4.1", Some("a"), 200, 9.0) });
        v.push(Entry { error: Some(Cow::Borrowed("model_not_found")), ..e(9_000, "nope", None, 404, 0.1) });
        v.push(Entry { error: Some(Cow::Borrowed("client_closed")), ..e(9_500, "gpt-4.1", Some("a"), 499, 5.0) });
        v.push(e(-1, "gpt-4.1", Some("a"), 200, 1.0)); // before the window
        v
    }

    #[test]
    fn totals_split_ok_client_errors_and_failures() {
        let r = aggregate(&sample(), T0, T0 + 120_000, DEFAULT_SLA_MS);
        let t = &r.total;
        assert_eq!(t.requests, 106);
        assert_eq!((t.ok, t.client_errors, t.failed), (102, 2, 2));
        assert!((t.error_rate - 2.0 / 106.0).abs() < 1e-12);
        assert_eq!(t.failovers, 1);
        assert_eq!(t.fallbacks, 1);
        assert_eq!(t.prompt_tokens, 1060);
        assert!((t.cost_usd - 0.106).abs() < 1e-9);
        // Latency over the 102 successful answers: 1..=100 ms plus 7 and 8, interpolated between the closest
        // ranks (sheepdog_policy::stats::percentile, the same definition as /status): rank 50.5 lies between
        // 49 and 50, rank 99.99 between 98 and 99.
        assert_eq!(t.latency_p50_ms, Some(49.5));
        assert!((t.latency_p99_ms.unwrap() - 98.99).abs() < 1e-9);
        assert_eq!(t.ttft_p50_ms, Some(24.75));
    }

    #[test]
    fn groups_by_requested_model_and_by_endpoint_and_served_model() {
        let r = aggregate(&sample(), T0, T0 + 120_000, DEFAULT_SLA_MS);
        assert_eq!(r.models[0].model, "gpt-4.1");
        assert_eq!(r.models[0].stats.requests, 105);
        assert_eq!(r.models[1].model, "nope");
        let names: Vec<(&str, &str, u64)> =
            r.endpoints.iter().map(|x| (x.endpoint.as_str(), x.model.as_str(), x.stats.requests)).collect();
        assert_eq!(names, vec![("a", "gpt-4.1", 102), ("b", "claude", 1), ("b", "gpt-4.1", 1)]);
    }

    #[test]
    fn the_timeline_covers_the_window_with_empty_buckets() {
        let r = aggregate(&sample(), T0, T0 + 120_000, DEFAULT_SLA_MS);
        assert_eq!(r.bucket_ms, 5_000);
        assert_eq!(r.timeline.len(), 24);
        assert_eq!(r.timeline.iter().map(|b| b.stats.requests).sum::<u64>(), 106);
        assert_eq!(r.timeline[0].stats.requests, 5);
        assert_eq!(r.timeline[23].stats.requests, 0);
        assert!(r.timeline.windows(2).all(|w| w[1].start_ms - w[0].start_ms == 5_000));
    }

    #[test]
    fn bucket_widths_are_round() {
        assert_eq!(bucket_ms(60_000), 1_000);
        assert_eq!(bucket_ms(3_600_000), 60_000);
        assert_eq!(bucket_ms(86_400_000), 1_800_000);
        assert_eq!(bucket_ms(30 * 86_400_000), 43_200_000);
        assert_eq!(bucket_ms(365 * 86_400_000), 86_400_000);
    }

    #[test]
    fn formats_carry_the_same_numbers() {
        let r = aggregate(&sample(), T0, T0 + 120_000, DEFAULT_SLA_MS);
        let c = csv(&r);
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(lines.len(), 1 + 1 + 2 + 3);
        assert!(lines[0].starts_with("scope,model,endpoint,requests,ok,"));
        assert!(lines[1].starts_with("total,,,106,102,2,2,"), "{}", lines[1]);
        assert!(c.contains("\nendpoint,claude,b,1,1,0,0,"), "{c}");
        let t = table(&r);
        assert!(t.contains("106 requests: 102 ok, 2 client errors, 2 failed; 1 failovers"), "{t}");
        assert!(t.contains("a/gpt-4.1"), "{t}");
        let j: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(j["total"]["requests"], 106);
        assert_eq!(j["models"][0]["model"], "gpt-4.1");
        assert_eq!(j["endpoints"][0]["endpoint"], "a");
    }

    #[test]
    fn charts_are_svg_with_one_bar_group_per_bucket() {
        let r = aggregate(&sample(), T0, T0 + 120_000, DEFAULT_SLA_MS);
        let c = charts(&r);
        let names: Vec<&str> = c.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, vec!["cost.svg", "latency.svg", "success.svg", "requests.svg", "latency_over_time.svg"]);
        for (_, svg) in &c {
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        }
        assert!(c[3].1.contains("Requests per 5s"));
        // 20 non-empty buckets carry an `ok` bar.
        assert_eq!(c[3].1.matches("class=\"s0\"").count(), 20, "{}", c[3].1);
    }

    #[test]
    fn answers_slower_than_the_sla_are_counted_per_group_and_drawn_against_its_line() {
        // Successful answers of 1..=100 ms plus 7, 8: 60 of them are slower than 42.5 ms.
        let r = aggregate(&sample(), T0, T0 + 120_000, 42.5);
        assert_eq!((r.sla_ms, r.total.over_sla, r.models[0].stats.over_sla), (42.5, 58, 58));
        assert!(table(&r).contains("slower than 42.5 ms"));
        let latency = &charts(&r)[1].1;
        assert!(latency.contains("SLA 42.5 ms") && latency.contains("class=\"marker\""), "{latency}");
        // One row (gpt-4.1; "nope" never answered) with p50, p95, p99 bars.
        assert_eq!(latency.matches("<rect class=\"s2\"").count(), 1, "{latency}");
        assert!(latency.contains("56.9 % over"), "{latency}");
    }

    #[test]
    fn success_and_cost_share_charts_name_each_model_with_its_figures() {
        let mut v = sample();
        v.push(Entry { cost_usd: Some(0.294), ..e(1_000, "claude", Some("b"), 200, 5.0) });
        let r = aggregate(&v, T0, T0 + 120_000, DEFAULT_SLA_MS);
        let c = charts(&r);
        // $0.105 of gpt-4.1 (105 rows), $0.001 of "nope" and $0.294 of claude: 73.5 % for claude, drawn first.
        let cost = &c[0].1;
        assert!(cost.contains("$0.2940 · 73.5 %") && cost.contains("$0.1050 · 26."), "{cost}");
        assert!(cost.contains("$0.4000 in total"), "{cost}");
        assert!(cost.find(">claude<").unwrap() < cost.find(">gpt-4.1<").unwrap());
        // gpt-4.1: 102 answered, 2 failed (client errors left out) -> 98.08 %, drawn red against 99.9 %.
        let success = &c[2].1;
        assert!(success.contains("98.08 % of 104"), "{success}");
        assert!(success.contains(&format!("fill=\"{}\"", chart::RED)) && success.contains(">99.9 %<"));
        assert!(!success.contains(">nope<"), "a model with only client errors has no success rate: {success}");
    }

    #[test]
    fn a_projection_is_in_every_format() {
        let cfg = crate::config::parse(
            "[[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodels = [\"gpt-4.1\"]\n\
             [[models]]\nname = \"gpt-4.1\"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n",
            "t.toml",
            &crate::config::ProcessEnv,
        )
        .unwrap();
        let mut r = aggregate(&sample(), T0, T0 + 120_000, DEFAULT_SLA_MS);
        // 1,060 prompt and 2,120 completion tokens: 1 to 2.
        r.projection = Some(projection::project(&r, &cfg, 3_000_000));
        let c = csv(&r);
        let head = c.lines().next().unwrap().split(',').count();
        let rows: Vec<&str> = c.lines().filter(|l| l.starts_with("projection")).collect();
        assert_eq!(rows.len(), 2, "{c}");
        assert!(rows.iter().all(|l| l.split(',').count() == head), "{c}");
        // 1 M in × $2 + 2 M out × $8 = $18.
        assert!(rows[0].starts_with("projection_model,gpt-4.1,,") && rows[0].contains(",1000000,2000000,18.00000000,"));
        assert!(rows[1].starts_with("projection_endpoint,gpt-4.1,a,"), "{c}");
        let t = table(&r);
        assert!(t.contains("What 3,000,000 tokens a month would cost (1,000,000 prompt"), "{t}");
        assert!(t.contains("$18.00"), "{t}");
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["projection"]["models"][0]["cost_usd"], 18.0);
        assert_eq!(j["projection"]["mix"]["source"], "log");
        r.projection = None;
        assert!(serde_json::to_value(&r).unwrap().get("projection").is_none());
    }

    #[test]
    fn an_empty_log_gives_zeros_not_errors() {
        let r = aggregate(&[], T0, T0 + 3_600_000, DEFAULT_SLA_MS);
        assert_eq!(r.total, Stats::default());
        assert!(r.models.is_empty());
        assert_eq!(r.timeline.len(), 60);
        assert_eq!(charts(&r).len(), 5);
    }
}
