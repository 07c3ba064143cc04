//! The quality gate, and `eval/report.json` + `eval/report.md` (scores with intervals, the confusion
//! matrix for label outputs, the worst examples side by side).

use std::fmt::Write as _;
use std::path::Path;

use retort_recipe::schema::eval::Gate;
use serde::{Deserialize, Serialize};

use crate::{EvalError, Report, metrics};

/// One bound of the gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateCheck {
    /// `min_score`, `min_vs_teacher` or `max_regression`.
    pub name: String,
    /// The bound.
    pub bound: f64,
    /// What was measured (comparable with `bound`).
    pub actual: f64,
    /// Whether it holds.
    pub passed: bool,
    /// A sentence for people.
    pub message: String,
}

/// The gate's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    /// Every bound holds (true when there are none).
    pub passed: bool,
    /// The bounds checked.
    pub checks: Vec<GateCheck>,
}

/// Checks `[eval.gate]` against the tuned model's primary score.
pub fn gate(r: &Report, g: &Gate) -> Result<GateResult, EvalError> {
    let mut checks = Vec::new();
    let primary = &r.primary;
    let tuned = r.primary_score("tuned");
    let need_tuned = |what: &str| {
        EvalError::Input(format!(
            "`eval.gate.{what}` needs `tuned` in `eval.compare`: the gate bounds the tuned model"
        ))
    };
    if let Some(min) = g.min_score {
        let t = tuned.ok_or_else(|| need_tuned("min_score"))?;
        let passed = t >= min;
        checks.push(GateCheck {
            name: "min_score".into(),
            bound: min,
            actual: t,
            passed,
            message: format!(
                "tuned {primary} {t:.4} {} the minimum {min:.4}{}",
                if passed { "meets" } else { "is below" },
                if passed { String::new() } else { format!(" by {:.4}", min - t) }
            ),
        });
    }
    if let Some(ratio) = g.min_vs_teacher {
        let t = tuned.ok_or_else(|| need_tuned("min_vs_teacher"))?;
        let teacher = r.primary_score("teacher").ok_or_else(|| {
            EvalError::Input("`eval.gate.min_vs_teacher` needs `teacher` in `eval.compare`".into())
        })?;
        let actual = if teacher > 0.0 { t / teacher } else { 1.0 };
        let passed = actual >= ratio;
        checks.push(GateCheck {
            name: "min_vs_teacher".into(),
            bound: ratio,
            actual,
            passed,
            message: format!(
                "tuned {primary} is {:.1}% of the teacher's ({t:.4} / {teacher:.4}); the gate asks for {:.1}%",
                actual * 100.0,
                ratio * 100.0
            ),
        });
    }
    if let Some(prev_path) = &g.max_regression_vs {
        let t = tuned.ok_or_else(|| need_tuned("max_regression_vs"))?;
        let text = std::fs::read_to_string(prev_path)
            .map_err(|source| EvalError::Io { path: prev_path.clone(), source })?;
        let prev: Report = serde_json::from_str(&text).map_err(|e| {
            EvalError::Input(format!("`{}` is not a retort eval report: {e}", prev_path.display()))
        })?;
        let before =
            prev.model("tuned").and_then(|m| m.scores.get(primary)).map(|s| s.value).ok_or_else(|| {
                EvalError::Input(format!(
                    "`{}` has no tuned `{primary}` score to compare with",
                    prev_path.display()
                ))
            })?;
        let drop = before - t;
        let passed = drop <= g.max_regression;
        checks.push(GateCheck {
            name: "max_regression".into(),
            bound: g.max_regression,
            actual: drop,
            passed,
            message: format!(
                "tuned {primary} {t:.4} vs {before:.4} in `{}`: {} of {:.4} (allowed {:.4})",
                prev_path.display(),
                if drop > 0.0 { "a drop" } else { "a change" },
                drop.abs(),
                g.max_regression
            ),
        });
    }
    Ok(GateResult { passed: checks.iter().all(|c| c.passed), checks })
}

/// Sentences on throughput, latency and cost per 1,000 requests, shared by the Markdown and HTML reports.
pub fn serving_lines(r: &Report, v: &crate::Serving) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = r.model("tuned") {
        out.push(format!(
            "tuned model on {}, batches of {}: {:.2} requests/s ({:.0}/hour), {:.1} generated tokens/s, \
             latency p50 {:.2} s, p95 {:.2} s",
            v.device,
            v.batch_size,
            t.requests_per_s,
            v.tuned_requests_per_hour,
            t.tokens_per_s,
            t.latency_p50_s,
            t.latency_p95_s
        ));
    }
    out.push(match (v.tuned_usd_per_1k, v.hardware_usd_per_hour) {
        (Some(c), Some(h)) => format!("tuned: ${c:.4} per 1,000 requests at ${h:.2}/hour"),
        _ => "tuned: set `eval.hardware_usd_per_hour` for a cost per 1,000 requests".to_string(),
    });
    out.push(match v.teacher_usd_per_1k {
        Some(c) => format!("teacher: ${c:.4} per 1,000 requests ({})", v.teacher_note),
        None => format!("teacher: no cost ({})", v.teacher_note),
    });
    out
}

/// The tuned model's confusion matrix for label outputs: the columns (the labels, then `(other)` for an
/// answer that is no label) and one row of counts per label of the teacher's.
pub fn confusion(r: &Report) -> Option<(Vec<String>, Vec<Vec<usize>>)> {
    let t = r.model("tuned")?;
    if r.labels.is_empty() {
        return None;
    }
    let mut cols = r.labels.clone();
    cols.push("(other)".into());
    let index =
        |text: &str| metrics::label_of(text, &r.labels).and_then(|l| r.labels.iter().position(|x| x == l));
    let mut counts = vec![vec![0usize; cols.len()]; r.labels.len()];
    for (a, e) in t.answers.iter().zip(&r.examples) {
        if let Some(i) = index(&e.reference) {
            counts[i][index(a).unwrap_or(cols.len() - 1)] += 1;
        }
    }
    Some((cols, counts))
}

/// Indices of `t`'s at most `n` worst answers, worst first: by normalised exact match plus chrF against
/// the reference, so near misses rank above nonsense; exact answers are left out.
pub fn worst(r: &Report, t: &crate::ModelResult, n: usize) -> Vec<usize> {
    let mut idx: Vec<(f64, usize)> = t
        .answers
        .iter()
        .zip(&r.examples)
        .enumerate()
        .map(|(i, (a, e))| {
            (metrics::normalized_exact_match(a, &e.reference) + metrics::chrf(a, &e.reference), i)
        })
        .filter(|(v, _)| *v < 2.0)
        .collect();
    idx.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    idx.into_iter().take(n).map(|(_, i)| i).collect()
}

/// One sentence on the judge's work, shared by the Markdown and HTML reports.
pub fn judge_line(j: &crate::judge::JudgeStats) -> String {
    format!(
        "`judge_win_rate`: `{}` judged each differing pair in both orders ({} verdicts, {} from the journal at \
         no cost, {} unreadable and counted as ties); equal answers score 0.5 unasked.",
        j.model, j.verdicts, j.cached, j.unreadable
    )
}

fn md_cell(s: &str, max: usize) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|");
    if one.chars().count() > max { format!("{}…", one.chars().take(max).collect::<String>()) } else { one }
}

/// The Markdown report.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Evaluation\n");
    let _ = writeln!(
        s,
        "{} test examples from `{}`. The references are the teacher's answers; scores are in [0, 1] with \
         bootstrapped 95% intervals. Primary metric: `{}`.\n",
        r.examples.len(),
        r.test_file.display(),
        r.primary
    );
    let _ = write!(s, "| model |");
    for m in &r.metrics {
        let _ = write!(s, " {m} |");
    }
    let _ = writeln!(s, " tokens/s |");
    let _ = writeln!(s, "|---|{}---|", "---|".repeat(r.metrics.len()));
    for m in &r.models {
        let _ = write!(s, "| {} |", m.model);
        for k in &r.metrics {
            match m.scores.get(k) {
                Some(x) => {
                    let _ = write!(s, " {:.3} [{:.3}, {:.3}] |", x.value, x.low, x.high);
                }
                None => {
                    let _ = write!(s, " - |");
                }
            }
        }
        let tps = if m.tokens_per_s > 0.0 { format!("{:.1}", m.tokens_per_s) } else { "-".into() };
        let _ = writeln!(s, " {tps} |");
    }
    if let Some(j) = &r.judge {
        let _ = writeln!(s, "\n{}", judge_line(j));
    }
    if let Some(v) = &r.serving {
        let _ = writeln!(s, "\n## Serving\n");
        for line in serving_lines(r, v) {
            let _ = writeln!(s, "- {line}");
        }
    }
    if let Some(g) = &r.gate {
        let _ = writeln!(s, "\n## Gate: {}\n", if g.passed { "passed" } else { "FAILED" });
        if g.checks.is_empty() {
            let _ = writeln!(s, "No bounds are set (`[eval.gate]`).");
        }
        for c in &g.checks {
            let _ = writeln!(s, "- {} `{}`: {}", if c.passed { "ok" } else { "FAILED" }, c.name, c.message);
        }
    }
    if let Some((cols, counts)) = confusion(r) {
        let _ = writeln!(s, "\n## Confusion matrix (tuned; rows: teacher, columns: tuned)\n");
        let _ = writeln!(s, "| teacher \\ tuned | {} |", cols.join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(cols.len()));
        for (row, counts) in r.labels.iter().zip(&counts) {
            let cells: Vec<String> = counts.iter().map(ToString::to_string).collect();
            let _ = writeln!(s, "| {row} | {} |", cells.join(" | "));
        }
    }
    if let Some(t) = r.model("tuned") {
        let idx = worst(r, t, 20);
        if !idx.is_empty() {
            let _ = writeln!(s, "\n## Worst examples (tuned)\n");
            let base = r.model("base");
            let _ = writeln!(
                s,
                "| line | input | teacher | tuned |{}",
                if base.is_some() { " base |" } else { "" }
            );
            let _ = writeln!(s, "|---|---|---|---|{}", if base.is_some() { "---|" } else { "" });
            for &i in &idx {
                let e = &r.examples[i];
                let _ = write!(
                    s,
                    "| {} | {} | {} | {} |",
                    e.line,
                    md_cell(&e.input, 80),
                    md_cell(&e.reference, 60),
                    md_cell(&t.answers[i], 60)
                );
                if let Some(b) = base {
                    let _ = write!(s, " {} |", md_cell(&b.answers[i], 60));
                }
                let _ = writeln!(s);
            }
        }
    }
    s
}

/// Writes `report.json`, `report.md` and `report.html` (with the training loss curve `loss_svg`, when
/// given) into `dir`, each atomically.
pub fn write(r: &Report, dir: &Path, loss_svg: Option<&str>) -> Result<(), EvalError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EvalError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let json = serde_json::to_vec_pretty(r).map_err(|e| EvalError::Input(e.to_string()))?;
    let p = dir.join("report.json");
    retort_io::write_atomic(&p, &json, true).map_err(io(&p))?;
    let p = dir.join("report.md");
    retort_io::write_atomic(&p, markdown(r).as_bytes(), true).map_err(io(&p))?;
    let p = dir.join("report.html");
    retort_io::write_atomic(&p, crate::html::html(r, loss_svg).as_bytes(), true).map_err(io(&p))?;
    Ok(())
}
