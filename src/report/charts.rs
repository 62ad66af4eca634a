//! The charts of a report, as files: the four a monthly cost review needs (cost share, latency against the
//! SLA and success rate by model, requests over time) and latency over time. Pure: a [`Report`] in, SVG text
//! out, drawn with the primitives of [`chart`](super::chart).

use super::{chart, ms_duration, rfc3339, ModelRow, Report};

/// The charts of a report, as (file name, SVG text): the four of a monthly cost review — `cost.svg` (cost share
/// by model), `latency.svg` (p50 / p95 / p99 by model against the SLA line), `success.svg` (success rate by
/// model against 99.9 %), `requests.svg` (requests over time) — and `latency_over_time.svg`.
pub fn charts(r: &Report) -> Vec<(&'static str, String)> {
    use chart::{num, percent, thousands, usd, Marker, Row};
    let span = |ms: i64| {
        let t = rfc3339(ms);
        format!("{} {}", &t[..10], &t[11..16])
    };
    let window = format!("{} to {} UTC", span(r.since_ms), span(r.until_ms));
    let labels: Vec<String> = r.timeline.iter().map(|b| time_label(b.start_ms, r.bucket_ms)).collect();
    let ok: Vec<f64> = r.timeline.iter().map(|b| b.stats.ok as f64).collect();
    let failed: Vec<f64> = r.timeline.iter().map(|b| b.stats.failed as f64).collect();
    let other: Vec<f64> = r.timeline.iter().map(|b| b.stats.client_errors as f64).collect();
    let width = humantime::format_duration(ms_duration(r.bucket_ms)).to_string();
    let requests = chart::stacked_bars(
        &format!("Requests per {width}, {window}"),
        &labels,
        &[("ok", chart::GREEN, &ok), ("failed", chart::RED, &failed), ("client errors", chart::GREY, &other)],
    );
    let p50: Vec<Option<f64>> = r.timeline.iter().map(|b| b.stats.latency_p50_ms).collect();
    let p95: Vec<Option<f64>> = r.timeline.iter().map(|b| b.stats.latency_p95_ms).collect();
    let over_time = chart::lines(
        "Latency of successful answers over time (ms)",
        &labels,
        &[("p50", chart::BLUE, &p50), ("p95", chart::ORANGE, &p95)],
    );

    // Cost share: the models that cost something, most expensive first.
    let mut by_cost: Vec<&ModelRow> = r.models.iter().filter(|m| m.stats.cost_usd > 0.0).collect();
    by_cost.sort_by(|a, b| b.stats.cost_usd.total_cmp(&a.stats.cost_usd).then_with(|| a.model.cmp(&b.model)));
    let total_cost = r.total.cost_usd;
    let cost_rows: Vec<Row> = by_cost
        .iter()
        .map(|m| {
            let share = if total_cost > 0.0 { m.stats.cost_usd / total_cost } else { 0.0 };
            Row {
                label: m.model.clone(),
                bars: vec![(share, chart::BLUE)],
                note: format!("{} · {:.1} %", usd(m.stats.cost_usd), share * 100.0),
            }
        })
        .collect();
    let cost = chart::rows(
        "Cost share by requested model",
        &format!("{} in total, {window}", usd(total_cost)),
        &cost_rows,
        cost_rows.iter().map(|r| r.bars[0].0).fold(0.0, f64::max),
        percent,
        None,
        &[],
    );

    // Latency against the SLA: models that answered, in the order of the table.
    let answered: Vec<&ModelRow> = r.models.iter().filter(|m| m.stats.ok > 0).collect();
    let lat_rows: Vec<Row> = answered
        .iter()
        .map(|m| {
            let s = &m.stats;
            let (p50, p95, p99) =
                (s.latency_p50_ms.unwrap_or(0.0), s.latency_p95_ms.unwrap_or(0.0), s.latency_p99_ms.unwrap_or(0.0));
            Row {
                label: m.model.clone(),
                bars: vec![(p50, chart::BLUE), (p95, chart::ORANGE), (p99, chart::RED)],
                note: format!(
                    "p99 {} ms · {:.1} % over",
                    thousands(p99.round() as u64),
                    s.over_sla as f64 * 100.0 / s.ok as f64
                ),
            }
        })
        .collect();
    let sla = Marker { at: r.sla_ms, label: format!("SLA {} ms", r.sla_ms) };
    let latency = chart::rows(
        "Latency by model against the SLA (ms)",
        &format!("successful answers, arrival to last byte; {window}"),
        &lat_rows,
        lat_rows.iter().flat_map(|r| r.bars.iter().map(|b| b.0)).fold(0.0, f64::max),
        num,
        Some(&sla),
        &[("p50", chart::BLUE), ("p95", chart::ORANGE), ("p99", chart::RED)],
    );

    // Success rate: of the requests the gateway had to serve (client errors left out).
    let served: Vec<&ModelRow> = r.models.iter().filter(|m| m.stats.ok + m.stats.failed > 0).collect();
    let success_rows: Vec<Row> = served
        .iter()
        .map(|m| {
            let s = &m.stats;
            let rate = s.ok as f64 / (s.ok + s.failed) as f64;
            let color = if rate >= 0.999 {
                chart::GREEN
            } else if rate >= 0.99 {
                chart::ORANGE
            } else {
                chart::RED
            };
            Row {
                label: m.model.clone(),
                bars: vec![(rate, color)],
                note: format!("{:.2} % of {}", rate * 100.0, thousands(s.ok + s.failed)),
            }
        })
        .collect();
    let target = Marker { at: 0.999, label: "99.9 %".into() };
    let success = chart::rows(
        "Success rate by requested model",
        &format!("answered ÷ (answered + failed); client errors (4xx) left out; {window}"),
        &success_rows,
        1.0,
        percent,
        Some(&target),
        &[],
    );
    vec![
        ("cost.svg", cost),
        ("latency.svg", latency),
        ("success.svg", success),
        ("requests.svg", requests),
        ("latency_over_time.svg", over_time),
    ]
}

/// `HH:MM` (UTC) for buckets under a day, `MM-DD` for day buckets.
fn time_label(start_ms: i64, bucket_ms: i64) -> String {
    let t = rfc3339(start_ms);
    // 2026-11-22T08:15:00Z
    if bucket_ms >= 86_400_000 {
        t[5..10].to_owned()
    } else if bucket_ms < 60_000 {
        t[11..19].to_owned()
    } else {
        t[11..16].to_owned()
    }
}
