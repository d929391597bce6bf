//! The console's HTML: the page frame, report tables and the SVG charts, written out here.
//!
//! Written by hand rather than with a template engine or a chart library: the pages are a few
//! tables and three kinds of chart, and SVG drawn on the server needs no JavaScript, no CDN and
//! nothing fetched at build time. Every text that comes from data goes through [`esc`]; the page's
//! Content-Security-Policy allows no inline script or style, so the charts use SVG attributes.

use std::fmt::Write as _;

use tollgate_meter::report::{Cell, Kind, Output, format_usd};

/// Text safe inside HTML elements and double- or single-quoted attributes.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A query-string value, percent-encoded (unreserved characters kept).
pub fn url_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The pages, in the order of the navigation bar: path and title.
pub const PAGES: [(&str, &str); 5] = [
    ("/spend", "Spend"),
    ("/budgets", "Budgets"),
    ("/breaches", "Breaches and alerts"),
    ("/failure-modes", "Failure modes"),
    ("/outcomes", "Outcomes per dollar"),
];

/// A whole page: the frame, the navigation with `current` marked, and `body`.
pub fn page(current: &str, title: &str, body: &str, scripts: &[&str]) -> String {
    let mut nav = String::new();
    for (path, name) in PAGES {
        let here = if path == current { " aria-current=\"page\"" } else { "" };
        let _ = write!(nav, "<a href=\"{path}\"{here}>{name}</a>");
    }
    if current != "/login" {
        nav.push_str(
            "<form method=\"post\" action=\"/logout\" class=\"logout\"><button type=\"submit\">Log out</button></form>",
        );
    }
    let mut tail = String::new();
    for s in scripts {
        let _ = write!(tail, "<script src=\"/assets/{s}\"></script>");
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · Tollgate</title><link rel=\"stylesheet\" href=\"/assets/console.css\"></head>\
         <body><header><span class=\"brand\">Tollgate</span><nav>{nav}</nav></header>\
         <main><h1>{t}</h1>{body}</main>{tail}</body></html>",
        t = esc(title)
    )
}

/// A report as a table: its columns, rows and `TOTAL` row, each cell printed as the report
/// prints it (`Output::text`), numbers right-aligned, flagged rows marked.
pub fn report_table(out: &Output, id: &str) -> String {
    let mut html = format!("<table class=\"report\" id=\"{}\"><thead><tr>", esc(id));
    for (name, kind) in &out.columns {
        let class = if matches!(kind, Kind::Key | Kind::Time | Kind::Flag) { "" } else { " class=\"num\"" };
        let _ = write!(html, "<th{class}>{}</th>", esc(name));
    }
    html.push_str("</tr></thead><tbody>");
    let flag_col = out.columns.iter().position(|(_, k)| *k == Kind::Flag);
    for row in &out.rows {
        let flagged = flag_col.and_then(|i| row.get(i)).is_some_and(|c| *c == Cell::Flag(true));
        html.push_str(if flagged { "<tr class=\"flagged\">" } else { "<tr>" });
        push_cells(&mut html, out, row);
        html.push_str("</tr>");
    }
    if out.rows.is_empty() {
        let _ =
            write!(html, "<tr><td colspan=\"{}\" class=\"empty\">no data in this period</td></tr>", out.columns.len());
    }
    html.push_str("</tbody>");
    if let Some(total) = &out.total {
        html.push_str("<tfoot><tr class=\"total\">");
        push_cells(&mut html, out, total);
        html.push_str("</tr></tfoot>");
    }
    html.push_str("</table>");
    html
}

fn push_cells(html: &mut String, out: &Output, row: &[Cell]) {
    for (i, cell) in row.iter().enumerate() {
        let kind = out.columns.get(i).map_or(Kind::Key, |c| c.1);
        let class = if matches!(kind, Kind::Key | Kind::Time | Kind::Flag) { "" } else { " class=\"num\"" };
        let text = match cell {
            Cell::Text(t) if t.is_empty() => "(none)".to_owned(),
            _ => out.text(i, cell),
        };
        let _ = write!(html, "<td{class}>{}</td>", esc(&text));
    }
}

/// The position of the column named `name`.
pub fn column(out: &Output, name: &str) -> Option<usize> {
    out.columns.iter().position(|(n, _)| n == name)
}

/// The label of a report row: its key cells joined by ` / `.
pub fn row_label(out: &Output, row: &[Cell]) -> String {
    let parts: Vec<String> = out
        .columns
        .iter()
        .zip(row)
        .filter(|((_, k), _)| *k == Kind::Key)
        .map(|(_, c)| match c {
            Cell::Text(t) if t.is_empty() => "(none)".to_owned(),
            Cell::Text(t) => t.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    parts.join(" / ")
}

/// A cell as a number for a chart's length (money in nano-USD).
pub fn magnitude(cell: &Cell) -> f64 {
    match cell {
        Cell::Int(n) | Cell::Time(n) => *n as f64,
        Cell::UInt(n) => *n as f64,
        Cell::Float(f) if f.is_finite() => *f,
        _ => 0.0,
    }
}

/// Series colours, distinguishable in print and for the common colour blindnesses (Okabe–Ito).
const COLOURS: [&str; 8] = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999"];

pub fn colour(i: usize) -> &'static str {
    COLOURS[i % COLOURS.len()]
}

/// One bar of [`hbars`]: its label, its length, the text printed at its end, and whether it is
/// flagged (drawn in the alarm colour).
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub text: String,
    pub flagged: bool,
}

/// Horizontal bars, longest at full width, with an optional dashed marker at `marker` (a
/// threshold) in the same units.
pub fn hbars(id: &str, caption: &str, bars: &[Bar], marker: Option<(f64, &str)>) -> String {
    if bars.is_empty() {
        return String::new();
    }
    let max = bars.iter().map(|b| b.value).chain(marker.map(|m| m.0)).fold(0.0_f64, f64::max);
    let (label_w, bar_w, row_h) = (220.0, 460.0, 22.0);
    let width = label_w + bar_w + 170.0;
    let height = row_h * bars.len() as f64 + 30.0;
    let mut svg = format!(
        "<figure class=\"chart\" id=\"{id}\"><svg role=\"img\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" \
         xmlns=\"http://www.w3.org/2000/svg\"><title>{cap}</title>",
        id = esc(id),
        cap = esc(caption)
    );
    for (i, b) in bars.iter().enumerate() {
        let y = 10.0 + row_h * i as f64;
        let w = if max > 0.0 { (b.value.max(0.0) / max) * bar_w } else { 0.0 };
        let fill = if b.flagged { "#D55E00" } else { "#0072B2" };
        let _ = write!(
            svg,
            "<text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\" class=\"label\">{label}</text>\
             <rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1}\" height=\"{h}\" fill=\"{fill}\"><title>{label}: {text}</title></rect>\
             <text x=\"{tx:.1}\" y=\"{ty}\" class=\"value\">{text}</text>",
            lx = label_w - 6.0,
            ty = y + 14.0,
            h = row_h - 6.0,
            tx = label_w + w + 6.0,
            label = esc(&truncate(&b.label, 32)),
            text = esc(&b.text),
        );
    }
    if let Some((m, text)) = marker {
        if max > 0.0 {
            let x = label_w + m / max * bar_w;
            let _ = write!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"4\" x2=\"{x:.1}\" y2=\"{y2}\" stroke=\"#444\" stroke-dasharray=\"4 3\"/>\
                 <text x=\"{x:.1}\" y=\"{ty}\" text-anchor=\"middle\" class=\"axis\">{t}</text>",
                y2 = height - 18.0,
                ty = height - 4.0,
                t = esc(text)
            );
        }
    }
    let _ = write!(svg, "</svg><figcaption>{}</figcaption></figure>", esc(caption));
    svg
}

/// Stacked columns: one per bucket (day or month), one colour per series, a legend under them.
/// Values are nano-USD; each segment's tooltip and the axis print exact dollars.
pub fn stacked_columns(id: &str, caption: &str, buckets: &[String], series: &[(String, Vec<i64>)]) -> String {
    if buckets.is_empty() {
        return String::new();
    }
    let totals: Vec<i64> =
        (0..buckets.len()).map(|b| series.iter().map(|(_, v)| v.get(b).copied().unwrap_or(0).max(0)).sum()).collect();
    let top = nice_ceiling(totals.iter().copied().max().unwrap_or(0));
    let (left, plot_w, plot_h, top_pad) = (110.0, 720.0, 240.0, 10.0);
    let width = left + plot_w + 20.0;
    let height = top_pad + plot_h + 60.0;
    let col_w = plot_w / buckets.len() as f64;
    let mut svg = format!(
        "<figure class=\"chart\" id=\"{id}\"><svg role=\"img\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" \
         xmlns=\"http://www.w3.org/2000/svg\"><title>{cap}</title>",
        id = esc(id),
        cap = esc(caption)
    );
    for step in 0..=4 {
        let v = top / 4 * step;
        let y = top_pad + plot_h - plot_h * step as f64 / 4.0;
        let _ = write!(
            svg,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{x2}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{tx}\" y=\"{ty:.1}\" text-anchor=\"end\" class=\"axis\">${v}</text>",
            x2 = left + plot_w,
            tx = left - 6.0,
            ty = y + 4.0,
            v = esc(&trim_usd(v)),
        );
    }
    for (b, bucket) in buckets.iter().enumerate() {
        let x = left + col_w * b as f64;
        let mut y = top_pad + plot_h;
        for (s, (name, values)) in series.iter().enumerate() {
            let v = values.get(b).copied().unwrap_or(0).max(0);
            if v == 0 || top == 0 {
                continue;
            }
            let h = v as f64 / top as f64 * plot_h;
            y -= h;
            let _ = write!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.2}\" width=\"{w:.1}\" height=\"{h:.2}\" fill=\"{c}\"><title>{bucket} {name}: ${usd}</title></rect>",
                w = (col_w * 0.8).max(1.0),
                c = colour(s),
                bucket = esc(bucket),
                name = esc(name),
                usd = format_usd(v),
            );
        }
        // Label every bucket when there are few, else about ten of them.
        let every = buckets.len().div_ceil(10).max(1);
        if b % every == 0 {
            let _ = write!(
                svg,
                "<text x=\"{tx:.1}\" y=\"{ty}\" text-anchor=\"middle\" class=\"axis\">{label}</text>",
                tx = x + col_w * 0.4,
                ty = top_pad + plot_h + 16.0,
                label = esc(bucket),
            );
        }
    }
    let mut lx = left;
    let ly = top_pad + plot_h + 40.0;
    for (s, (name, _)) in series.iter().enumerate() {
        let label = truncate(name, 22);
        let _ = write!(
            svg,
            "<rect x=\"{lx:.1}\" y=\"{ry}\" width=\"10\" height=\"10\" fill=\"{c}\"/><text x=\"{tx:.1}\" y=\"{ty}\" class=\"label\">{label}</text>",
            ry = ly - 9.0,
            c = colour(s),
            tx = lx + 14.0,
            ty = ly,
            label = esc(&label),
        );
        lx += 24.0 + 7.0 * label.chars().count() as f64;
    }
    let _ = write!(svg, "</svg><figcaption>{}</figcaption></figure>", esc(caption));
    svg
}

/// A progress bar of `value` against `ceiling`, with ticks at the alert thresholds (percent).
pub fn gauge(id: &str, value: i64, ceiling: i64, thresholds: &[u32], text: &str) -> String {
    let (w, h) = (420.0, 22.0);
    let pct = if ceiling > 0 { value as f64 / ceiling as f64 } else { 0.0 };
    let fill = if pct >= 1.0 {
        "#D55E00"
    } else if thresholds.iter().any(|t| pct * 100.0 >= f64::from(*t)) {
        "#E69F00"
    } else {
        "#009E73"
    };
    let mut svg = format!(
        "<svg class=\"gauge\" id=\"{id}\" role=\"img\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" xmlns=\"http://www.w3.org/2000/svg\">\
         <title>{t}</title><rect x=\"0\" y=\"3\" width=\"{w}\" height=\"16\" fill=\"#eee\"/>\
         <rect x=\"0\" y=\"3\" width=\"{bw:.1}\" height=\"16\" fill=\"{fill}\"/>",
        id = esc(id),
        t = esc(text),
        bw = pct.clamp(0.0, 1.0) * w,
    );
    for t in thresholds {
        let x = (f64::from(*t) / 100.0).clamp(0.0, 1.0) * w;
        let _ =
            write!(svg, "<line x1=\"{x:.1}\" y1=\"0\" x2=\"{x:.1}\" y2=\"{h}\" stroke=\"#222\" stroke-width=\"2\"/>");
    }
    svg.push_str("</svg>");
    svg
}

/// The smallest 1, 2 or 5 × 10ⁿ nano-USD at or above `max`, divisible by 4 for the axis.
fn nice_ceiling(max: i64) -> i64 {
    let mut unit: i64 = 4;
    loop {
        for m in [1, 2, 5] {
            let v = unit.saturating_mul(m);
            if v >= max || v == i64::MAX {
                return v;
            }
        }
        unit = unit.saturating_mul(10);
    }
}

/// Exact dollars without trailing zeros (`0.500000000` → `0.5`), for axis ticks.
fn trim_usd(nanos: i64) -> String {
    let full = format_usd(nanos);
    let trimmed = full.trim_end_matches('0').trim_end_matches('.');
    trimmed.to_owned()
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(max - 1).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(esc("<a href='x'>&\"</a>"), "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;");
        assert_eq!(url_value("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn axis_ceiling_is_round_and_exact() {
        assert_eq!(nice_ceiling(0), 4);
        assert_eq!(nice_ceiling(3_000_000_000), 4_000_000_000);
        assert_eq!(nice_ceiling(4_100_000_000), 8_000_000_000);
        assert_eq!(nice_ceiling(9_000_000_000), 20_000_000_000);
        assert_eq!(trim_usd(500_000_000), "0.5");
        assert_eq!(trim_usd(2_000_000_000), "2");
        assert_eq!(trim_usd(1), "0.000000001");
    }

    #[test]
    fn charts_escape_labels_and_draw_every_series() {
        let svg = stacked_columns(
            "c",
            "spend",
            &["2026-12-01".into(), "2026-12-02".into()],
            &[("<team>".into(), vec![1_000, 0]), ("b".into(), vec![500, 2_000])],
        );
        assert!(svg.contains("&lt;team&gt;") && !svg.contains("<team>"));
        assert_eq!(svg.matches("<rect").count(), 3 + 2, "three segments and two legend swatches");
        assert!(svg.contains("$0.000001000"), "exact dollars in the tooltip: {svg}");
        let bars = [Bar { label: "x".into(), value: 2.0, text: "2".into(), flagged: true }];
        assert!(hbars("h", "cap", &bars, Some((1.0, "limit"))).contains("#D55E00"));
        assert!(gauge("g", 90, 100, &[80, 100], "90%").contains("#E69F00"));
    }
}
