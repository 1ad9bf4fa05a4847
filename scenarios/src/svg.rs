//! Small SVG charts for the reports: a line chart of series over time and a grouped bar chart
//! of latency percentiles. Plain text output, no dependencies.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 360.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" upper bound for an axis.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 10.0 {
        format!("{:.1}", v)
    } else if v.abs() >= 0.01 {
        format!("{:.2}", v)
    } else {
        format!("{:.4}", v)
    }
}

fn frame(out: &mut String, title: &str, x_label: &str, y_label: &str, y_max: f64) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>
"#,
        W / 2.0,
        esc(title),
        LEFT + (W - LEFT - RIGHT) / 2.0,
        H - 10.0,
        esc(x_label),
        TOP + (H - TOP - BOTTOM) / 2.0,
        TOP + (H - TOP - BOTTOM) / 2.0,
        esc(y_label)
    );
    for i in 0..=4 {
        let v = y_max * i as f64 / 4.0;
        let y = H - BOTTOM - (H - TOP - BOTTOM) * i as f64 / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            fmt_num(v)
        );
    }
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="#333"/>"##,
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM
    );
}

/// Series of (x, y) points on shared axes.
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> String {
    let mut out = String::new();
    let x_max = nice_max(
        series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
            .fold(0.0, f64::max),
    );
    let y_max = nice_max(
        series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .fold(0.0, f64::max),
    );
    frame(&mut out, title, x_label, y_label, y_max);
    let px = |x: f64| LEFT + (W - LEFT - RIGHT) * x / x_max;
    let py = |y: f64| H - BOTTOM - (H - TOP - BOTTOM) * y / y_max;
    for i in 0..=4 {
        let x = x_max * i as f64 / 4.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            px(x),
            H - BOTTOM + 16.0,
            fmt_num(x)
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" fill="{color}">{}</text>"#,
            LEFT + 10.0,
            TOP + 14.0 + 14.0 * i as f64,
            esc(name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Groups of bars: one group per category, one bar per label within it.
pub fn bars(title: &str, y_label: &str, labels: &[&str], groups: &[(String, Vec<f64>)]) -> String {
    let mut out = String::new();
    let y_max = nice_max(
        groups
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0, f64::max),
    );
    frame(&mut out, title, "", y_label, y_max);
    let n = groups.len().max(1) as f64;
    let gw = (W - LEFT - RIGHT) / n;
    let bw = (gw * 0.8) / labels.len().max(1) as f64;
    let py = |y: f64| H - BOTTOM - (H - TOP - BOTTOM) * y / y_max;
    for (g, (name, vals)) in groups.iter().enumerate() {
        let x0 = LEFT + gw * g as f64 + gw * 0.1;
        for (i, v) in vals.iter().enumerate() {
            let _ = writeln!(
                out,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {}</title></rect>"#,
                x0 + bw * i as f64,
                py(*v),
                bw.max(1.0),
                (H - BOTTOM - py(*v)).max(0.0),
                COLORS[i % COLORS.len()],
                esc(name),
                labels.get(i).copied().unwrap_or(""),
                fmt_num(*v)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle" font-size="10">{}</text>"#,
            x0 + gw * 0.4,
            H - BOTTOM + 14.0,
            esc(name)
        );
    }
    for (i, l) in labels.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            W - RIGHT - 90.0,
            TOP + 14.0 * i as f64,
            COLORS[i % COLORS.len()],
            W - RIGHT - 76.0,
            TOP + 9.0 + 14.0 * i as f64,
            esc(l)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg() {
        let l = lines("t <1>", "s", "n", &[("a", vec![(0.0, 1.0), (10.0, 5.0)])]);
        assert!(l.starts_with("<svg") && l.trim_end().ends_with("</svg>"));
        assert!(l.contains("t &lt;1&gt;"));
        assert!(l.contains("<polyline"));
        let b = bars(
            "lat",
            "s",
            &["p50", "p99"],
            &[("create_vm".into(), vec![0.5, 2.0])],
        );
        assert_eq!(b.matches("<rect").count(), 1 + 2 + 2);
        assert_eq!(nice_max(7.3), 10.0);
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(240.0), 250.0);
    }
}
