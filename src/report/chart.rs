//! Small, dependency-free SVG charts for `sheepdog report`: stacked bars and lines over time buckets, and
//! horizontal rows of bars with a reference line (an SLA, a target). Pure functions from numbers to SVG text; no I/O.

use std::fmt::Write as _;

/// Series colours.
pub const GREEN: &str = "#2e9e5b";
/// See [`GREEN`].
pub const RED: &str = "#d64541";
/// See [`GREEN`].
pub const GREY: &str = "#9aa0a6";
/// See [`GREEN`].
pub const BLUE: &str = "#2b7bba";
/// See [`GREEN`].
pub const ORANGE: &str = "#e8912d";

const W: f64 = 860.0;
const H: f64 = 320.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 48.0;

/// Text safe to put in SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A round upper bound for an axis (1, 2, 2.5 or 5 times a power of ten) at or above `max`.
pub fn nice_max(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * p).find(|v| *v >= max * (1.0 - 1e-12)).unwrap_or(10.0 * p)
}

/// An axis number: no decimals from 10, one from 1, three below.
pub fn num(v: f64) -> String {
    if v == 0.0 {
        "0".to_owned()
    } else if v.abs() >= 10.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 1.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.3}", v)
    }
}

/// The opening of a chart `h` pixels high: the `svg` element, a white background and the title.
fn open_svg(out: &mut String, h: f64, title: &str) {
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"{W}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        esc(title)
    );
}

/// The frame: title, y grid with 5 ticks up to `ymax`, and every k-th x label (at most about 12).
fn frame(out: &mut String, title: &str, labels: &[String], ymax: f64, legend: &[(&str, &str)]) {
    open_svg(out, H, title);
    let plot_h = H - TOP - BOTTOM;
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let y = TOP + plot_h * (1.0 - i as f64 / 5.0);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            num(v)
        );
    }
    let n = labels.len().max(1);
    let step = n.div_ceil(12);
    let slot = (W - LEFT - RIGHT) / n as f64;
    for (i, l) in labels.iter().enumerate().step_by(step) {
        let x = LEFT + slot * (i as f64 + 0.5);
        let _ =
            writeln!(out, "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", H - BOTTOM + 16.0, esc(l));
    }
    draw_legend(out, legend);
}

/// The legend, `(name, colour)` per series, right-aligned in the title line.
fn draw_legend(out: &mut String, legend: &[(&str, &str)]) {
    let mut x = W - RIGHT;
    for (name, color) in legend.iter().rev() {
        x -= 14.0 + 7.0 * name.len() as f64;
        let _ = writeln!(
            out,
            "<rect x=\"{x:.1}\" y=\"10\" width=\"10\" height=\"10\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"19\">{}</text>",
            x + 13.0,
            esc(name)
        );
        x -= 10.0;
    }
}

/// Stacked bars, one group per label; series are `(name, colour, values per label)`. Each non-empty segment is
/// a `rect` with `class="sN"` (N = the series' index).
pub fn stacked_bars(title: &str, labels: &[String], series: &[(&str, &str, &[f64])]) -> String {
    let totals: Vec<f64> =
        (0..labels.len()).map(|i| series.iter().map(|s| s.2.get(i).copied().unwrap_or(0.0)).sum()).collect();
    let ymax = nice_max(totals.iter().copied().fold(0.0, f64::max));
    let mut out = String::with_capacity(4096 + labels.len() * 200);
    let legend: Vec<(&str, &str)> = series.iter().map(|s| (s.0, s.1)).collect();
    frame(&mut out, title, labels, ymax, &legend);
    let plot_h = H - TOP - BOTTOM;
    let slot = (W - LEFT - RIGHT) / labels.len().max(1) as f64;
    let bar_w = (slot * 0.8).max(1.0);
    for i in 0..labels.len() {
        let x = LEFT + slot * i as f64 + (slot - bar_w) / 2.0;
        let mut base = 0.0;
        for (si, (_, color, values)) in series.iter().enumerate() {
            let v = values.get(i).copied().unwrap_or(0.0);
            if v <= 0.0 {
                continue;
            }
            let y1 = TOP + plot_h * (1.0 - (base + v) / ymax);
            let h = plot_h * v / ymax;
            let _ = writeln!(
                out,
                "<rect class=\"s{si}\" x=\"{x:.1}\" y=\"{y1:.1}\" width=\"{bar_w:.1}\" height=\"{h:.1}\" fill=\"{color}\"/>"
            );
            base += v;
        }
    }
    out.push_str("</svg>\n");
    out
}

/// Lines over the labels; `None` values leave a gap.
pub fn lines(title: &str, labels: &[String], series: &[(&str, &str, &[Option<f64>])]) -> String {
    let max = series.iter().flat_map(|s| s.2.iter().flatten().copied()).fold(0.0, f64::max);
    let ymax = nice_max(max);
    let mut out = String::with_capacity(4096 + labels.len() * 100);
    let legend: Vec<(&str, &str)> = series.iter().map(|s| (s.0, s.1)).collect();
    frame(&mut out, title, labels, ymax, &legend);
    let plot_h = H - TOP - BOTTOM;
    let slot = (W - LEFT - RIGHT) / labels.len().max(1) as f64;
    for (si, (_, color, values)) in series.iter().enumerate() {
        let mut path = String::new();
        let mut pen_down = false;
        for (i, v) in values.iter().enumerate() {
            match v {
                Some(v) => {
                    let x = LEFT + slot * (i as f64 + 0.5);
                    let y = TOP + plot_h * (1.0 - v / ymax);
                    let _ = write!(path, "{}{x:.1},{y:.1} ", if pen_down { "L" } else { "M" });
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        if !path.is_empty() {
            let _ = writeln!(
                out,
                "<path class=\"s{si}\" d=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
                path.trim_end()
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

/// One row of a horizontal bar chart: a label, one or more bars (drawn one under the other, e.g. p50 / p95 /
/// p99), and a note printed after the longest bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The row's name (a model).
    pub label: String,
    /// `(value, colour)` per bar.
    pub bars: Vec<(f64, &'static str)>,
    /// Text after the bars (the value, a share).
    pub note: String,
}

/// A vertical reference line across every row (an SLA, a target).
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    /// Where, in the axis' unit.
    pub at: f64,
    /// Its caption, printed at the top of the line.
    pub label: String,
}

/// Horizontal bars, one row per item in the given order, on an x axis from 0 to `xmax` (rounded up to a round
/// number, and to the marker) with 5 ticks formatted by `tick`. Each bar is a `rect` with `class="sN"` (N = its
/// index in the row); the marker is a dashed `line` with `class="marker"`.
pub fn rows(
    title: &str,
    subtitle: &str,
    items: &[Row],
    xmax: f64,
    tick: fn(f64) -> String,
    marker: Option<&Marker>,
    legend: &[(&str, &str)],
) -> String {
    let per_row = items.iter().map(|r| r.bars.len()).max().unwrap_or(1).max(1);
    let bar_h = if per_row == 1 { 18.0 } else { 9.0 };
    let row_h = bar_h * per_row as f64 + 10.0;
    let top = TOP + 18.0;
    let h = top + row_h * items.len().max(1) as f64 + 30.0;
    let label_w = 200.0;
    let plot_w = W - label_w - RIGHT - 170.0;
    let xmax = nice_max(xmax.max(marker.map_or(0.0, |m| m.at)));
    let x_of = |v: f64| label_w + plot_w * (v.max(0.0) / xmax).min(1.0);
    let mut out = String::with_capacity(2048 + items.len() * 400);
    open_svg(&mut out, h, title);
    if !subtitle.is_empty() {
        let _ = writeln!(out, "<text x=\"{LEFT}\" y=\"36\" fill=\"#555\">{}</text>", esc(subtitle));
    }
    let axis_y = h - 24.0;
    for i in 0..=5 {
        let v = xmax * i as f64 / 5.0;
        let x = x_of(v);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{top:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            axis_y - 6.0,
            axis_y + 8.0,
            esc(&tick(v))
        );
    }
    for (i, row) in items.iter().enumerate() {
        let y = top + row_h * i as f64 + 5.0;
        let label = if row.label.is_empty() { "(none)" } else { row.label.as_str() };
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            label_w - 8.0,
            y + (row_h - 10.0) / 2.0 + 4.0,
            esc(label)
        );
        let mut right = label_w;
        for (bi, (v, color)) in row.bars.iter().enumerate() {
            let x2 = x_of(*v);
            right = right.max(x2);
            let _ = writeln!(
                out,
                "<rect class=\"s{bi}\" x=\"{label_w}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>",
                y + bar_h * bi as f64,
                x2 - label_w,
                bar_h - 1.0
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            right + 6.0,
            y + (row_h - 10.0) / 2.0 + 4.0,
            esc(&row.note)
        );
    }
    if let Some(m) = marker {
        let x = x_of(m.at);
        let _ = writeln!(
            out,
            "<line class=\"marker\" x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"{RED}\" \
             stroke-width=\"1.5\" stroke-dasharray=\"5,3\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{RED}\">{}</text>",
            top - 4.0,
            axis_y - 6.0,
            top - 7.0,
            esc(&m.label)
        );
    }
    draw_legend(&mut out, legend);
    out.push_str("</svg>\n");
    out
}

/// A share 0–1 as a percentage.
pub fn percent(v: f64) -> String {
    format!("{:.0} %", v * 100.0)
}

/// US dollars: thousands separated from $1,000, cents from $1, four decimals below.
pub fn usd(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("${}", thousands(v.round() as u64))
    } else if v.abs() >= 1.0 || v == 0.0 {
        format!("${v:.2}")
    } else {
        format!("${v:.4}")
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(10.0), 10.0);
        assert_eq!(nice_max(11.0), 20.0);
        assert_eq!(nice_max(230.0), 250.0);
        assert_eq!(nice_max(0.0042), 0.005);
        assert_eq!(nice_max(f64::NAN), 1.0);
    }

    #[test]
    fn stacked_bars_stack_segments_up_to_the_total() {
        let labels = vec!["a".to_owned(), "b".to_owned()];
        let svg = stacked_bars("t", &labels, &[("ok", GREEN, &[4.0, 10.0]), ("bad", RED, &[6.0, 0.0])]);
        assert_eq!(svg.matches("class=\"s0\"").count(), 2);
        assert_eq!(svg.matches("class=\"s1\"").count(), 1);
        // Axis to 10: the first bar's two segments fill the plot height (228 px) together.
        let heights: Vec<f64> = svg
            .lines()
            .filter(|l| l.starts_with("<rect class=\"s"))
            .filter_map(|l| l.split("height=\"").nth(1)?.split('"').next()?.parse().ok())
            .collect();
        assert_eq!(heights.len(), 3, "{heights:?}");
        assert!((heights[0] + heights[1] - 228.0).abs() < 0.2, "{heights:?}");
    }

    #[test]
    fn lines_leave_gaps_and_text_is_escaped() {
        let labels: Vec<String> = (0..4).map(|i| i.to_string()).collect();
        let svg = lines("<p50 & p95>", &labels, &[("p50", BLUE, &[Some(1.0), None, Some(2.0), Some(3.0)])]);
        assert!(svg.contains("&lt;p50 &amp; p95&gt;"));
        let d = svg.split(" d=\"").nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert_eq!(d.matches('L').count(), 1, "{d}");
    }

    fn rects(svg: &str) -> Vec<(String, f64)> {
        svg.lines()
            .filter(|l| l.starts_with("<rect class=\"s"))
            .filter_map(|l| {
                let class = l.split("class=\"").nth(1)?.split('"').next()?.to_owned();
                Some((class, l.split("width=\"").nth(1)?.split('"').next()?.parse().ok()?))
            })
            .collect()
    }

    #[test]
    fn rows_scale_bars_to_the_axis_and_draw_the_marker_where_it_belongs() {
        let items = vec![
            Row { label: "a".into(), bars: vec![(500.0, BLUE), (1000.0, ORANGE)], note: "n1".into() },
            Row { label: "<b>".into(), bars: vec![(250.0, BLUE), (3000.0, ORANGE)], note: "n2".into() },
        ];
        let m = Marker { at: 2000.0, label: "SLA 2000 ms".into() };
        let svg = rows("t", "sub", &items, 3000.0, num, Some(&m), &[("p50", BLUE), ("p99", ORANGE)]);
        let r = rects(&svg);
        assert_eq!(r.iter().filter(|(c, _)| c == "s0").count(), 2);
        assert_eq!(r.iter().filter(|(c, _)| c == "s1").count(), 2);
        // Axis to 5000 (3000 rounds up), plot 470 px wide: 500 -> 47 px, 3000 -> 282 px.
        assert!((r[0].1 - 47.0).abs() < 0.2 && (r[3].1 - 282.0).abs() < 0.2, "{r:?}");
        let marker = svg.lines().find(|l| l.starts_with("<line class=\"marker\"")).unwrap();
        let x: f64 = marker.split("x1=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
        assert!((x - (200.0 + 470.0 * 0.4)).abs() < 0.2, "{marker}");
        assert!(svg.contains("SLA 2000 ms") && svg.contains("&lt;b&gt;") && svg.contains(">sub<"));
    }

    #[test]
    fn the_axis_reaches_the_marker_and_bars_never_leave_the_plot() {
        let items = vec![Row { label: "a".into(), bars: vec![(10.0, BLUE)], note: String::new() }];
        let svg = rows("t", "", &items, 10.0, num, Some(&Marker { at: 2000.0, label: "SLA".into() }), &[]);
        assert!(svg.contains(">2000<"), "{svg}");
        let over = vec![Row { label: "a".into(), bars: vec![(-1.0, BLUE), (f64::INFINITY, RED)], note: String::new() }];
        let r = rects(&rows("t", "", &over, 1.0, percent, None, &[]));
        assert!(r.iter().all(|(_, w)| (0.0..=470.0).contains(w)), "{r:?}");
    }

    #[test]
    fn money_and_counts_read_like_a_finance_report() {
        assert_eq!(usd(80_000.0), "$80,000");
        assert_eq!(usd(4.2), "$4.20");
        assert_eq!(usd(0.0028), "$0.0028");
        assert_eq!(usd(0.0157), "$0.0157");
        assert_eq!(usd(0.0), "$0.00");
        assert_eq!(thousands(10_000_000), "10,000,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(percent(0.999), "100 %");
    }
}
