//! Small, dependency-free SVG charts for `sheepdog report`: stacked bars and lines over time buckets, and
//! horizontal bars. Pure functions from numbers to SVG text; no I/O.

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

fn num(v: f64) -> String {
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

/// One horizontal bar per item, largest first, with its value printed.
pub fn horizontal_bars(title: &str, items: &[(String, f64)]) -> String {
    let mut items: Vec<&(String, f64)> = items.iter().collect();
    items.sort_by(|a, b| b.1.total_cmp(&a.1));
    let row = 26.0;
    let h = TOP + row * items.len().max(1) as f64 + 20.0;
    let label_w = 200.0;
    let xmax = nice_max(items.iter().map(|i| i.1).fold(0.0, f64::max));
    let mut out = String::with_capacity(1024 + items.len() * 200);
    open_svg(&mut out, h, title);
    let plot_w = W - label_w - RIGHT - 80.0;
    for (i, (name, v)) in items.iter().enumerate() {
        let y = TOP + row * i as f64;
        let w = plot_w * v / xmax;
        let label = if name.is_empty() { "(none)" } else { name.as_str() };
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <rect class=\"s0\" x=\"{label_w}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{BLUE}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            label_w - 8.0,
            y + 15.0,
            esc(label),
            row - 8.0,
            label_w + w + 6.0,
            y + 15.0,
            num(*v)
        );
    }
    out.push_str("</svg>\n");
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

    #[test]
    fn horizontal_bars_put_the_largest_first() {
        let svg = horizontal_bars("cost", &[("small".into(), 1.0), ("big".into(), 3.0)]);
        assert!(svg.find("big").unwrap() < svg.find("small").unwrap());
    }
}
