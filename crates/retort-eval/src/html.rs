//! `eval/report.html`: one self-contained file (inline CSS and SVG, no script, no network) that any
//! browser opens from a job's artefacts: scores with their 95% intervals as a chart and a table, the
//! gate, serving cost, the confusion matrix for label outputs, the training loss curve and the worst
//! examples side by side.

use std::fmt::Write as _;

use crate::Report;
use crate::report::serving_lines;

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}\
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#17692f}.bad{color:#b3261e;font-weight:bold}\
.ex td{max-width:320px;white-space:pre-wrap;word-break:break-word;font-size:90%}";

/// Model colours in the chart, by position.
const COLOURS: [&str; 4] = ["#8d99ae", "#2b7a78", "#e07a5f", "#6d597a"];

/// A horizontal bar per model: the primary score, with its 95% interval as a whisker.
fn score_chart(r: &Report) -> String {
    let (w, row, left, right) = (640.0, 34.0, 90.0, 60.0);
    let h = 30.0 + row * r.models.len() as f64 + 24.0;
    let x = |v: f64| left + v.clamp(0.0, 1.0) * (w - left - right);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12" role="img" aria-label="{} per model">"#,
        esc(&r.primary)
    );
    for k in 0..=10 {
        let v = f64::from(k) / 10.0;
        let _ = write!(
            s,
            r##"<line x1="{0:.1}" y1="20" x2="{0:.1}" y2="{1:.1}" stroke="#e5e5e5"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle" fill="#555">{v:.1}</text>"##,
            x(v),
            h - 22.0,
            h - 8.0
        );
    }
    for (i, m) in r.models.iter().enumerate() {
        let Some(sc) = m.scores.get(&r.primary) else { continue };
        let y = 26.0 + row * i as f64;
        let colour = COLOURS[i % COLOURS.len()];
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{left}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{} {}: {:.4} [{:.4}, {:.4}]</title></rect>"##,
            left - 8.0,
            y + row * 0.45,
            esc(&m.model),
            x(sc.value) - left,
            row * 0.6,
            esc(&m.model),
            esc(&r.primary),
            sc.value,
            sc.low,
            sc.high
        );
        let cy = y + row * 0.3;
        let _ = write!(
            s,
            r##"<path d="M{lo:.1} {a:.1}V{b:.1}M{lo:.1} {cy:.1}H{hi:.1}M{hi:.1} {a:.1}V{b:.1}" stroke="#222" stroke-width="1.5" fill="none"/><text x="{t:.1}" y="{ty:.1}" fill="#222">{v:.3}</text>"##,
            lo = x(sc.low),
            hi = x(sc.high),
            a = cy - 6.0,
            b = cy + 6.0,
            t = x(sc.high) + 6.0,
            ty = cy + 4.0,
            v = sc.value
        );
    }
    s.push_str("</svg>");
    s
}

/// Rows: the teacher's label; columns: the tuned model's (and "(other)" for no label), shaded by count.
fn confusion(r: &Report) -> Option<String> {
    let (cols, counts) = crate::report::confusion(r)?;
    let max = counts.iter().flatten().copied().max().unwrap_or(0).max(1);
    let mut s = String::from("<table><tr><th>teacher \\ tuned</th>");
    for c in &cols {
        let _ = write!(s, "<th>{}</th>", esc(c));
    }
    s.push_str("</tr>");
    for (i, row) in r.labels.iter().enumerate() {
        let _ = write!(s, "<tr><th>{}</th>", esc(row));
        for (j, &n) in counts[i].iter().enumerate() {
            let alpha = n as f64 / max as f64 * 0.85;
            let hue = if i == j { "43,122,120" } else { "224,122,95" };
            let _ = write!(s, r#"<td class="num" style="background:rgba({hue},{alpha:.2})">{n}</td>"#);
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    Some(s)
}

/// The whole page. `loss_svg` is training's `loss.svg`, inlined when given.
pub fn html(r: &Report, loss_svg: Option<&str>) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>retort evaluation</title>\
         <style>{STYLE}</style></head><body><h1>Evaluation</h1><p>{} held-out test examples from <code>{}</code>. \
         The references are the teacher's answers; scores are in [0, 1] with bootstrapped 95% intervals. \
         Primary metric: <code>{}</code>.</p>",
        r.examples.len(),
        esc(&r.test_file.display().to_string()),
        esc(&r.primary)
    );
    s.push_str(&score_chart(r));
    s.push_str("<table><tr><th>model</th>");
    for m in &r.metrics {
        let _ = write!(s, "<th>{}</th>", esc(m));
    }
    s.push_str("<th>tokens/s</th></tr>");
    for m in &r.models {
        let _ = write!(s, "<tr><td>{}</td>", esc(&m.model));
        for k in &r.metrics {
            match m.scores.get(k) {
                Some(x) => {
                    let _ = write!(s, r#"<td class="num">{:.3} [{:.3}, {:.3}]</td>"#, x.value, x.low, x.high);
                }
                None => s.push_str("<td>-</td>"),
            }
        }
        let tps = if m.tokens_per_s > 0.0 { format!("{:.1}", m.tokens_per_s) } else { "-".into() };
        let _ = write!(s, r#"<td class="num">{tps}</td></tr>"#);
    }
    s.push_str("</table>");
    if let Some(j) = &r.judge {
        let _ = write!(s, "<p>{}</p>", esc(&crate::report::judge_line(j)));
    }
    if let Some(g) = &r.gate {
        let (class, verdict) = if g.passed { ("ok", "passed") } else { ("bad", "FAILED") };
        let _ = write!(s, r#"<h2>Gate: <span class="{class}">{verdict}</span></h2><ul>"#);
        if g.checks.is_empty() {
            s.push_str("<li>No bounds are set (<code>[eval.gate]</code>).</li>");
        }
        for c in &g.checks {
            let (class, word) = if c.passed { ("ok", "ok") } else { ("bad", "FAILED") };
            let _ = write!(
                s,
                r#"<li><span class="{class}">{word}</span> <code>{}</code>: {}</li>"#,
                esc(&c.name),
                esc(&c.message)
            );
        }
        s.push_str("</ul>");
    }
    if let Some(v) = &r.serving {
        s.push_str("<h2>Serving</h2><ul>");
        for line in serving_lines(r, v) {
            let _ = write!(s, "<li>{}</li>", esc(&line));
        }
        s.push_str("</ul>");
    }
    if let Some(table) = confusion(r) {
        let _ = write!(s, "<h2>Confusion matrix (tuned)</h2>{table}");
    }
    if let Some(svg) =
        loss_svg.filter(|t| t.trim_start().starts_with("<svg") || t.trim_start().starts_with("<?xml"))
    {
        // Our own file (retort-train's plot); the XML declaration is not allowed inside HTML.
        let svg = svg.trim_start();
        let svg =
            if svg.starts_with("<?xml") { svg.split_once("?>").map_or(svg, |(_, rest)| rest) } else { svg };
        let _ = write!(s, "<h2>Training loss</h2>{svg}");
    }
    if let Some(t) = r.model("tuned") {
        let idx = crate::report::worst(r, t, 20);
        if !idx.is_empty() {
            let base = r.model("base");
            s.push_str("<h2>Worst examples (tuned)</h2><table class=\"ex\"><tr><th>line</th><th>input</th><th>teacher</th><th>tuned</th>");
            if base.is_some() {
                s.push_str("<th>base</th>");
            }
            s.push_str("</tr>");
            for &i in &idx {
                let e = &r.examples[i];
                let _ = write!(
                    s,
                    "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{}</td>",
                    e.line,
                    esc(&e.input),
                    esc(&e.reference),
                    esc(&t.answers[i])
                );
                if let Some(b) = base {
                    let _ = write!(s, "<td>{}</td>", esc(&b.answers[i]));
                }
                s.push_str("</tr>");
            }
            s.push_str("</table>");
        }
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

    use std::collections::BTreeMap;

    use super::*;
    use crate::{Example, ModelResult, Score};

    fn model(name: &str, value: f64, answers: &[&str]) -> ModelResult {
        let mut scores = BTreeMap::new();
        scores.insert("label_accuracy".to_string(), Score { value, low: value - 0.1, high: value + 0.1 });
        ModelResult {
            model: name.into(),
            scores,
            seconds: 1.0,
            tokens_per_s: 10.0,
            requests_per_s: 3.0,
            latency_p50_s: 0.5,
            latency_p95_s: 0.9,
            answers: answers.iter().map(ToString::to_string).collect(),
        }
    }

    fn report() -> Report {
        let refs = ["bug", "bug", "billing", "other"];
        Report {
            format: 1,
            test_file: "data/test.jsonl".into(),
            primary: "label_accuracy".into(),
            metrics: vec!["label_accuracy".into()],
            examples: refs
                .iter()
                .enumerate()
                .map(|(i, r)| Example {
                    line: i + 1,
                    input: format!("<script>alert({i})</script>"),
                    reference: (*r).into(),
                })
                .collect(),
            models: vec![
                model("base", 0.0, &["zz", "zz", "zz", "zz"]),
                model("tuned", 0.5, &["bug", "billing", "billing", "<b>"]),
            ],
            labels: vec!["billing".into(), "bug".into(), "other".into()],
            fingerprint: String::new(),
            gate: None,
            serving: None,
            judge: None,
        }
    }

    #[test]
    fn text_from_the_data_is_escaped() {
        let page = html(&report(), None);
        assert!(!page.contains("<script>"), "an input reached the page unescaped");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("&lt;b&gt;"));
        assert_eq!(esc(r#"a&"'"#), "a&amp;&quot;&#39;");
    }

    #[test]
    fn chart_has_a_bar_and_an_interval_per_model() {
        let svg = score_chart(&report());
        assert_eq!(svg.matches("<rect").count(), 2);
        assert_eq!(svg.matches("<path").count(), 2);
        assert!(svg.contains("tuned label_accuracy: 0.5000 [0.4000, 0.6000]"), "{svg}");
    }

    #[test]
    fn confusion_matrix_counts_each_pair() {
        let t = confusion(&report()).unwrap();
        // Rows in label order: billing (1 example, answered billing), bug (2: bug, billing),
        // other (1: answered "<b>", which is no label).
        let cells: Vec<&str> = t.split("\">").skip(1).filter_map(|c| c.split("</td>").next()).collect();
        assert_eq!(cells, ["1", "0", "0", "0", "1", "1", "0", "0", "0", "0", "0", "1"], "{t}");
    }

    #[test]
    fn loss_curve_is_inlined_without_its_xml_declaration() {
        let page = html(&report(), Some("<?xml version=\"1.0\"?>\n<svg id=\"loss\"></svg>"));
        assert!(page.contains("<h2>Training loss</h2>\n<svg id=\"loss\">"), "{page}");
        assert!(!page.contains("<?xml"));
        assert!(!html(&report(), Some("not an svg")).contains("Training loss"));
    }
}
