//! The loss curve as a self-contained SVG (no fonts or image libraries needed; any browser shows it):
//! training loss per step, its running mean, and validation loss as points.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 400.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 48.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A tick step of 1, 2 or 5 times a power of ten giving about `n` ticks over `span`.
fn tick_step(span: f64, n: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / n;
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|s| *s >= raw).unwrap_or(10.0 * p)
}

fn fmt_num(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{v:.decimals$}")
}

/// Renders `loss` (`(step, value)`) and `val` points into an SVG document.
pub fn loss_svg(loss: &[(u64, f64)], val: &[(u64, f64)], title: &str) -> String {
    let finite = |p: &&(u64, f64)| p.1.is_finite();
    let all: Vec<&(u64, f64)> = loss.iter().chain(val).filter(finite).collect();
    let max_step = all.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let (mut lo, mut hi) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if all.is_empty() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let ystep = tick_step(hi - lo, 5.0);
    lo = (lo / ystep).floor() * ystep;
    hi = (hi / ystep).ceil() * ystep;
    let xstep = tick_step(max_step, 8.0).max(1.0);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |s: f64| LEFT + s / max_step * pw;
    let y = |v: f64| TOP + (hi - v) / (hi - lo) * ph;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r##"<rect width="{W}" height="{H}" fill="#fff"/>"##);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        esc(&format!("{title}: training loss"))
    );
    // Grid and ticks.
    let mut v = lo;
    while v <= hi + ystep * 1e-6 {
        let yy = y(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e5e5e5"/>"##,
            W - RIGHT
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            yy + 4.0,
            fmt_num(v, ystep)
        );
        v += ystep;
    }
    let mut s = 0.0;
    while s <= max_step + 1e-6 {
        let xx = x(s);
        let _ = writeln!(
            out,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#f0f0f0"/>"##,
            H - BOTTOM
        );
        let _ = writeln!(
            out,
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            H - BOTTOM + 16.0,
            fmt_num(s, xstep)
        );
        s += xstep;
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">optimizer step</text>"#,
        LEFT + pw / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">loss per label token</text>"#,
        TOP + ph / 2.0
    );
    // Raw training loss, then a running mean over a tenth of the run.
    let pts: Vec<&(u64, f64)> = loss.iter().filter(finite).collect();
    let path = |points: &[(f64, f64)]| -> String {
        points
            .iter()
            .enumerate()
            .map(|(i, (a, b))| format!("{}{:.1},{:.1}", if i == 0 { "M" } else { "L" }, x(*a), y(*b)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let raw: Vec<(f64, f64)> = pts.iter().map(|p| (p.0 as f64, p.1)).collect();
    if !raw.is_empty() {
        let _ =
            writeln!(out, r##"<path d="{}" fill="none" stroke="#9ecae1" stroke-width="1"/>"##, path(&raw));
        let window = (raw.len() / 10).max(1);
        let smooth: Vec<(f64, f64)> = (0..raw.len())
            .map(|i| {
                let from = i.saturating_sub(window - 1);
                let slice = &raw[from..=i];
                (raw[i].0, slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64)
            })
            .collect();
        let _ =
            writeln!(out, r##"<path d="{}" fill="none" stroke="#08519c" stroke-width="2"/>"##, path(&smooth));
    }
    for p in val.iter().filter(finite) {
        let _ = writeln!(
            out,
            r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#e6550d"><title>step {}: validation loss {:.4}</title></circle>"##,
            x(p.0 as f64),
            y(p.1),
            p.0,
            p.1
        );
    }
    // Legend.
    let lx = W - RIGHT - 190.0;
    let _ = writeln!(
        out,
        r##"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="#08519c" stroke-width="2"/>"##,
        TOP + 14.0,
        lx + 20.0,
        TOP + 14.0
    );
    let _ = writeln!(out, r#"<text x="{}" y="{}">training (running mean)</text>"#, lx + 26.0, TOP + 18.0);
    if !val.is_empty() {
        let _ = writeln!(out, r##"<circle cx="{}" cy="{}" r="4" fill="#e6550d"/>"##, lx + 10.0, TOP + 32.0);
        let _ = writeln!(out, r#"<text x="{}" y="{}">validation</text>"#, lx + 26.0, TOP + 36.0);
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(tick_step(10.0, 5.0), 2.0);
        assert_eq!(tick_step(0.7, 5.0), 0.2);
        assert_eq!(tick_step(1000.0, 8.0), 200.0);
    }

    #[test]
    fn the_plot_holds_every_series_and_escapes_the_title() {
        let loss: Vec<(u64, f64)> = (1..=50).map(|s| (s, 3.0 / s as f64)).collect();
        let svg = loss_svg(&loss, &[(25, 0.2), (50, 0.15)], "a<b");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<path").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 3, "two validation points and the legend");
        assert!(svg.contains("a&lt;b"));
        // Non-finite losses do not produce NaN coordinates.
        let svg = loss_svg(&[(1, f64::NAN), (2, 1.0)], &[], "x");
        assert!(!svg.contains("NaN"));
    }
}
