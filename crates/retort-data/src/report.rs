//! Counts of what the data pipeline left out or changed, each with the first few line numbers so a
//! user can open the file at the right place. Nothing is dropped silently.

use std::fmt;

use serde::Serialize;

/// How many line numbers a [`Tally`] keeps.
pub const KEEP_LINES: usize = 5;

/// A count with the first [`KEEP_LINES`] dataset lines (1-based) it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// How many.
    pub count: usize,
    /// The first few lines, in the order they were met.
    pub lines: Vec<usize>,
}

impl Tally {
    /// Counts one more, remembering its line while fewer than [`KEEP_LINES`] are kept.
    pub fn add(&mut self, line: usize) {
        self.count += 1;
        if self.lines.len() < KEEP_LINES {
            self.lines.push(line);
        }
    }
}

impl fmt::Display for Tally {
    /// `3 (lines 4, 9, 12)`, `7 (lines 1, 2, 3, 4, 5, ...)` or `0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.count)?;
        if self.lines.is_empty() {
            return Ok(());
        }
        let word = if self.lines.len() == 1 { "line" } else { "lines" };
        let list: Vec<String> = self.lines.iter().map(usize::to_string).collect();
        let more = if self.count > self.lines.len() { ", ..." } else { "" };
        write!(f, " ({word} {}{more})", list.join(", "))
    }
}

/// Why a dataset row was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The line is not JSON (or not UTF-8).
    NotJson,
    /// JSON, but not the shape of the dataset format.
    WrongShape,
    /// No assistant turn to learn from.
    NoAssistant,
    /// The chat template raised an error for this conversation (e.g. "System role not supported").
    TemplateRefused,
    /// The chat template renders an earlier assistant turn differently once later turns follow.
    TemplateRewrites,
    /// The tokenizer failed on the rendered text.
    Tokenizer,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::NotJson => "not JSON",
            Reason::WrongShape => "wrong shape for the format",
            Reason::NoAssistant => "no assistant turn",
            Reason::TemplateRefused => "refused by the chat template",
            Reason::TemplateRewrites => "chat template rewrites earlier turns",
            Reason::Tokenizer => "tokenizer failed",
        })
    }
}

/// Rows skipped for one reason (policy `on_bad_row = "skip"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Why.
    pub reason: Reason,
    /// How many rows, and where.
    pub rows: Tally,
    /// The full message of the first one, which usually says exactly what to fix.
    pub first: String,
}

/// Skipped rows grouped by reason, in the order the reasons were first met.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Skips(pub Vec<Skipped>);

impl Skips {
    /// Counts a skipped row.
    pub fn add(&mut self, reason: Reason, line: usize, message: impl FnOnce() -> String) {
        if let Some(s) = self.0.iter_mut().find(|s| s.reason == reason) {
            s.rows.add(line);
        } else {
            let mut rows = Tally::default();
            rows.add(line);
            self.0.push(Skipped { reason, rows, first: message() });
        }
    }

    /// All skipped rows.
    pub fn total(&self) -> usize {
        self.0.iter().map(|s| s.rows.count).sum()
    }

    /// Rows skipped for one reason.
    pub fn count(&self, reason: Reason) -> usize {
        self.0.iter().find(|s| s.reason == reason).map_or(0, |s| s.rows.count)
    }

    /// Adds another set of skips to these.
    pub fn extend(&mut self, other: Skips) {
        for s in other.0 {
            if let Some(mine) = self.0.iter_mut().find(|m| m.reason == s.reason) {
                mine.rows.count += s.rows.count;
                for line in s.rows.lines {
                    if mine.rows.lines.len() < KEEP_LINES {
                        mine.rows.lines.push(line);
                    }
                }
            } else {
                self.0.push(s);
            }
        }
    }
}

impl fmt::Display for Skips {
    /// One line per reason: `not JSON: 2 (lines 4, 9); first: ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {}; first: {}", s.reason, s.rows, s.first)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_keep_the_first_lines_and_say_when_there_are_more() {
        let mut t = Tally::default();
        assert_eq!(t.to_string(), "0");
        t.add(4);
        assert_eq!(t.to_string(), "1 (line 4)");
        for l in 5..12 {
            t.add(l);
        }
        assert_eq!(t.to_string(), "8 (lines 4, 5, 6, 7, 8, ...)");
    }

    #[test]
    fn skips_group_by_reason_and_merge() {
        let mut a = Skips::default();
        a.add(Reason::NotJson, 3, || "first".into());
        a.add(Reason::NotJson, 7, || "second".into());
        let mut b = Skips::default();
        b.add(Reason::TemplateRefused, 9, || "refused".into());
        b.add(Reason::NotJson, 11, || "x".into());
        a.extend(b);
        assert_eq!(a.total(), 4);
        assert_eq!(a.count(Reason::NotJson), 3);
        assert_eq!(a.0[0].rows.lines, [3, 7, 11]);
        assert_eq!(a.0[0].first, "first");
        assert_eq!(
            a.to_string(),
            "not JSON: 3 (lines 3, 7, 11); first: first\nrefused by the chat template: 1 (line 9); first: refused"
        );
    }
}
