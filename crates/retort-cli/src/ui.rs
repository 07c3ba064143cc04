//! How retort talks: human text (colour when the terminal and `NO_COLOR` allow) or JSON lines, chosen by
//! `--log-format`. Results go to stdout, everything else (diagnostics, progress, logs) to stderr.

use std::io::{IsTerminal, Write};

use anstyle::{AnsiColor, Effects, Style};
use clap::ValueEnum;
use serde_json::json;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human on a terminal, JSON lines otherwise (a job's log file, a pipe).
    Auto,
    /// Human-readable text.
    Human,
    /// One JSON object per line.
    Json,
}

/// The resolved output settings for one run.
#[derive(Debug, Clone, Copy)]
pub struct Ui {
    /// JSON lines instead of text.
    pub json: bool,
    /// Colour on stderr.
    pub color: bool,
    /// -1 quiet (-q), 0 normal, 1+ verbose (-v).
    pub verbosity: i8,
}

/// Set when a stage reports that it had nothing to do (see [`Ui::up_to_date`]); `retort run` reads and
/// clears it to record each stage's decision. Stages run one after another in one process.
static STAGE_UP_TO_DATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the stage that just ran reported `up to date`; clears the flag.
pub fn take_up_to_date() -> bool {
    STAGE_UP_TO_DATE.swap(false, std::sync::atomic::Ordering::Relaxed)
}

impl Ui {
    /// Resolves `auto` against the terminal and `NO_COLOR`.
    pub fn new(format: LogFormat, verbosity: i8) -> Ui {
        let stderr_tty = std::io::stderr().is_terminal();
        let json = match format {
            LogFormat::Auto => !stderr_tty,
            LogFormat::Human => false,
            LogFormat::Json => true,
        };
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let force = std::env::var_os("CLICOLOR_FORCE").is_some_and(|v| !v.is_empty() && v != "0");
        let color = !json && !no_color && (stderr_tty || force);
        Ui { json, color, verbosity }
    }

    fn paint(&self, style: Style, text: &str) -> String {
        if self.color {
            format!("{}{text}{}", style.render(), style.render_reset())
        } else {
            text.to_string()
        }
    }

    /// Writes raw text to stderr.
    pub fn stderr(&self, text: &str) {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(text.as_bytes());
        let _ = err.flush();
    }

    /// Writes one line to stdout (the command's result).
    pub fn stdout_line(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
    }

    /// An error message with an optional hint.
    pub fn error(&self, message: &str, hint: Option<&str>) {
        if self.json {
            let mut v = json!({"level": "error", "message": message});
            if let Some(h) = hint {
                v["hint"] = json!(h);
            }
            self.stderr(&format!("{v}\n"));
            return;
        }
        let red = Style::new().fg_color(Some(AnsiColor::Red.into())).effects(Effects::BOLD);
        let cyan = Style::new().fg_color(Some(AnsiColor::Cyan.into())).effects(Effects::BOLD);
        let mut text = format!("{} {message}\n", self.paint(red, "error:"));
        if let Some(h) = hint {
            text.push_str(&format!("\n{} {h}\n", self.paint(cyan, "hint:")));
        }
        self.stderr(&text);
    }

    /// The `up to date` status: the stage finds its last result still valid and does nothing.
    pub fn up_to_date(&self, detail: &str) {
        STAGE_UP_TO_DATE.store(true, std::sync::atomic::Ordering::Relaxed);
        self.status("up to date", detail);
    }

    /// A status line for people (`created`, `ok`); suppressed by `-q`; JSON event in JSON mode.
    pub fn status(&self, verb: &str, detail: &str) {
        if self.verbosity < 0 {
            return;
        }
        if self.json {
            self.stderr(&format!("{}\n", json!({"level": "info", "event": verb, "message": detail})));
            return;
        }
        let green = Style::new().fg_color(Some(AnsiColor::Green.into())).effects(Effects::BOLD);
        self.stderr(&format!("{} {detail}\n", self.paint(green, &format!("{verb:>9}"))));
    }
}
