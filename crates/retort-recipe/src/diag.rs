//! Diagnostics: what is wrong, where (file, line, column, key path), what was found, what is allowed,
//! and how to fix it. Rendered for people (with the source line) or as JSON lines for tools.

use std::fmt::Write as _;

use anstyle::{AnsiColor, Effects, Style};
use serde::Serialize;

use crate::secrets;
use crate::source::{Position, Source};
use crate::tree::Span;

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The recipe cannot be used.
    Error,
    /// The recipe works but probably not as intended.
    Warning,
}

/// One problem found in a recipe.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnostic {
    /// Error or warning (`level` in JSON, as in every JSON line retort writes).
    #[serde(rename = "level")]
    pub severity: Severity,
    /// A stable short name for the kind of problem (`unknown-key`, `type`, `range`, `secret`, ...).
    pub code: &'static str,
    /// The key path it is about (`train.lr`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Byte range in the source.
    #[serde(skip)]
    pub span: Option<Span>,
    /// The problem in one line.
    pub message: String,
    /// What the recipe has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
    /// What would be accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// How to fix it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Diagnostic {
    /// A new error.
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            code,
            path: None,
            span: None,
            message: message.into(),
            found: None,
            expected: None,
            hint: None,
        }
    }

    /// A new warning.
    pub fn warning(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(code, message) }
    }

    /// Sets the key path.
    pub fn path(mut self, p: impl ToString) -> Self {
        self.path = Some(p.to_string());
        self
    }

    /// Sets the span.
    pub fn span(mut self, s: Span) -> Self {
        self.span = Some(s);
        self
    }

    /// Sets the span if there is one.
    pub fn maybe_span(mut self, s: Option<Span>) -> Self {
        self.span = s;
        self
    }

    /// Sets what was found.
    pub fn found(mut self, f: impl Into<String>) -> Self {
        self.found = Some(f.into());
        self
    }

    /// Sets what is allowed.
    pub fn expected(mut self, e: impl Into<String>) -> Self {
        self.expected = Some(e.into());
        self
    }

    /// Sets the hint.
    pub fn hint(mut self, h: impl Into<String>) -> Self {
        self.hint = Some(h.into());
        self
    }

    /// Sets the hint if there is one.
    pub fn maybe_hint(mut self, h: Option<String>) -> Self {
        if h.is_some() {
            self.hint = h;
        }
        self
    }

    /// True for errors.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// All diagnostics of one recipe file, with the source they point into.
#[derive(Debug, Clone)]
pub struct Report {
    /// The recipe text.
    pub source: Source,
    /// Problems, sorted by position.
    pub diagnostics: Vec<Diagnostic>,
    /// Secret values found in the source; every rendering replaces them.
    pub(crate) secrets: Vec<String>,
}

/// Output flavour for [`Report::render`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenderStyle {
    /// Plain text with source snippets.
    Plain,
    /// The same with ANSI colours.
    Color,
}

#[derive(Serialize)]
struct JsonDiag<'a> {
    file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    col: Option<usize>,
    #[serde(flatten)]
    diag: &'a Diagnostic,
}

impl Report {
    pub(crate) fn new(source: Source, mut diagnostics: Vec<Diagnostic>, secrets: Vec<String>) -> Self {
        diagnostics.sort_by_key(|d| (d.span.as_ref().map_or(usize::MAX, |s| s.start), d.severity));
        Report { source, diagnostics, secrets }
    }

    /// Number of errors.
    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    /// Number of warnings.
    pub fn warning_count(&self) -> usize {
        self.diagnostics.len() - self.error_count()
    }

    /// True when there is at least one error.
    pub fn has_errors(&self) -> bool {
        self.error_count() > 0
    }

    /// Line and column of a diagnostic, if it has a span.
    pub fn position(&self, d: &Diagnostic) -> Option<Position> {
        d.span.as_ref().map(|s| self.source.position(s.start))
    }

    /// Every diagnostic as one JSON object per line (secrets redacted).
    pub fn render_json(&self) -> String {
        let mut out = String::new();
        for d in &self.diagnostics {
            let pos = self.position(d);
            let j = JsonDiag {
                file: self.source.path.display().to_string(),
                line: pos.map(|p| p.line),
                col: pos.map(|p| p.col),
                diag: d,
            };
            let line = serde_json::to_string(&j).unwrap_or_default();
            out.push_str(&secrets::redact(&line, &self.secrets));
            out.push('\n');
        }
        out
    }

    /// Every diagnostic for people, rustc style, with secrets redacted.
    pub fn render(&self, style: RenderStyle) -> String {
        let mut out = String::new();
        for d in &self.diagnostics {
            self.render_one(d, style, &mut out);
            out.push('\n');
        }
        secrets::redact(&out, &self.secrets)
    }

    fn render_one(&self, d: &Diagnostic, style: RenderStyle, out: &mut String) {
        let paint = |s: Style, text: &str| -> String {
            match style {
                RenderStyle::Plain => text.to_string(),
                RenderStyle::Color => format!("{}{text}{}", s.render(), s.render_reset()),
            }
        };
        let bold = Style::new().effects(Effects::BOLD);
        let (label, color) = match d.severity {
            Severity::Error => ("error", AnsiColor::Red),
            Severity::Warning => ("warning", AnsiColor::Yellow),
        };
        let sev = Style::new().fg_color(Some(color.into())).effects(Effects::BOLD);
        let blue = Style::new().fg_color(Some(AnsiColor::Blue.into())).effects(Effects::BOLD);
        let _ = writeln!(out, "{}{} {}", paint(sev, label), paint(bold, ":"), paint(bold, &d.message));
        let file = self.source.path.display();
        let pos = self.position(d);
        let gutter_width = pos.map_or(1, |p| p.line.to_string().len());
        let pad = " ".repeat(gutter_width);
        match pos {
            Some(p) => {
                let _ = writeln!(out, "{pad}{} {file}:{}:{}", paint(blue, "-->"), p.line, p.col);
            }
            None => {
                let _ = writeln!(out, "{pad}{} {file}", paint(blue, "-->"));
            }
        }
        if let (Some(span), Some(p)) = (&d.span, pos) {
            let raw_line = self.source.line_text(p.line);
            // Underline the span on its first line only.
            let end = self.source.position(span.end.max(span.start + 1));
            let raw_len = raw_line.chars().count();
            let mut width = if end.line == p.line {
                end.col.saturating_sub(p.col).max(1)
            } else {
                raw_len.saturating_sub(p.col - 1).max(1)
            };
            // Redact before measuring, so the caret fits the text shown.
            let redacted = secrets::redact(raw_line, &self.secrets);
            let mut col = p.col;
            if redacted != raw_line {
                let before: String = raw_line.chars().take(p.col - 1).collect();
                col = secrets::redact(&before, &self.secrets).chars().count() + 1;
                width = width.min(redacted.chars().count().saturating_sub(col - 1)).max(1);
            }
            let (line, col, width) = window(&redacted, col, width);
            let label = match (&d.found, &d.expected) {
                (Some(f), Some(e)) => format!("found {f}; expected {e}"),
                (Some(f), None) => format!("found {f}"),
                (None, Some(e)) => format!("expected {e}"),
                (None, None) => String::new(),
            };
            let bar = paint(blue, "|");
            let _ = writeln!(out, "{pad} {bar}");
            let _ = writeln!(out, "{} {bar} {line}", paint(blue, &p.line.to_string()));
            let marks = format!("{}{}", " ".repeat(col - 1), "^".repeat(width));
            let under = if label.is_empty() { marks } else { format!("{marks} {label}") };
            let _ = writeln!(out, "{pad} {bar} {}", paint(sev, &under));
        } else {
            if let Some(f) = &d.found {
                let _ = writeln!(out, "{pad} = found: {f}");
            }
            if let Some(e) = &d.expected {
                let _ = writeln!(out, "{pad} = expected: {e}");
            }
        }
        if let Some(path) = &d.path {
            let _ = writeln!(out, "{pad} = key: `{path}`");
        }
        if let Some(h) = &d.hint {
            let hint = Style::new().fg_color(Some(AnsiColor::Cyan.into())).effects(Effects::BOLD);
            let _ = writeln!(out, "{}{} {h}", paint(hint, "hint"), paint(bold, ":"));
        }
    }
}

/// Longest source line shown whole in a snippet.
const MAX_SNIPPET: usize = 120;

/// Cuts a long line to a window around the column, marking the cuts with `...`. Returns the text
/// shown, the column and the underline width within it.
fn window(line: &str, col: usize, width: usize) -> (String, usize, usize) {
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= MAX_SNIPPET {
        return (line.to_string(), col, width);
    }
    let start = col.saturating_sub(1).saturating_sub(40);
    let end = (start + MAX_SNIPPET - 6).min(chars.len());
    let mut shown: String = chars[start..end].iter().collect();
    let mut new_col = col - start;
    if start > 0 {
        shown.insert_str(0, "...");
        new_col += 3;
    }
    if end < chars.len() {
        shown.push_str("...");
    }
    let width = width.min(end.saturating_sub(col - 1)).max(1);
    (shown, new_col, width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_windowed_around_the_column() {
        let line = format!("{}X{}", "a".repeat(500), "b".repeat(500));
        let (shown, col, width) = window(&line, 501, 1);
        assert!(shown.len() < 130, "{}", shown.len());
        assert!(shown.starts_with("...") && shown.ends_with("..."));
        assert_eq!(shown.chars().nth(col - 1), Some('X'));
        assert_eq!(width, 1);
        let (short, c, w) = window("lr = 1", 6, 1);
        assert_eq!((short.as_str(), c, w), ("lr = 1", 6, 1));
    }

    #[test]
    fn carets_fit_redacted_values() {
        let key = "sk-abcdefghijklmnopqrstuvwxyz0123456789";
        let text = format!("[teacher]\nprovider = \"openai\"\nmodel = \"m\"\napi_key = \"{key}\"\n");
        let report = match crate::load_source(Source::from_text("k.toml", text)) {
            Err(r) => r,
            Ok(_) => panic!("a literal key must be rejected"),
        };
        let out = report.render(RenderStyle::Plain);
        assert!(!out.contains(key));
        let lines: Vec<&str> = out.lines().collect();
        let code = lines.iter().position(|l| l.contains("api_key = \"<redacted>\"")).unwrap();
        let carets = lines[code + 1];
        let caret_start = carets.find('^').unwrap();
        let value_start = lines[code].find('"').unwrap();
        assert_eq!(caret_start, value_start, "{out}");
        assert_eq!(carets.matches('^').count(), "\"<redacted>\"".len(), "{out}");
    }
}
