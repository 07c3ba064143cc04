//! Progress of long work: an indicatif bar on a terminal, JSON lines otherwise (a job's log), nothing
//! with `-q`. JSON lines are rate-limited so a log file does not grow with every item. Stages report
//! through [`retort_io::Progress`]; [`CliProgress`] renders it.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::ui::Ui;

/// Shortest interval between two JSON progress lines (the first and the last are always written).
pub const JSON_INTERVAL: Duration = Duration::from_secs(2);

/// Renders the tasks a stage starts, following the run's output settings.
pub struct CliProgress {
    ui: Ui,
}

impl CliProgress {
    /// Progress for this run's output settings.
    pub fn new(ui: &Ui) -> CliProgress {
        CliProgress { ui: *ui }
    }
}

impl retort_io::Progress for CliProgress {
    fn task(&self, name: &str, total: u64) -> Box<dyn retort_io::Task> {
        Box::new(Progress::new(&self.ui, name, total))
    }
}

impl retort_io::Task for Progress {
    fn inc(&self, n: u64) {
        Progress::inc(self, n);
    }
    fn set_message(&self, msg: &str) {
        Progress::set_message(self, msg);
    }
    fn finish(&self) {
        Progress::finish(self);
    }
}

/// A progress reporter for one task with a known total.
pub struct Progress {
    inner: Inner,
}

enum Inner {
    Bar(ProgressBar),
    Json(Mutex<JsonState>),
    Hidden,
}

struct JsonState {
    task: String,
    done: u64,
    total: u64,
    message: String,
    started: Instant,
    last_emit: Option<Instant>,
    out: Box<dyn Write + Send>,
}

impl JsonState {
    fn emit(&mut self, event: &str) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 { self.done as f64 / elapsed } else { 0.0 };
        let eta = if rate > 0.0 && self.total >= self.done {
            Some((self.total - self.done) as f64 / rate)
        } else {
            None
        };
        let mut v = json!({
            "event": event,
            "task": self.task,
            "done": self.done,
            "total": self.total,
            "elapsed_s": (elapsed * 10.0).round() / 10.0,
            "rate_per_s": (rate * 100.0).round() / 100.0,
        });
        if let Some(eta) = eta {
            v["eta_s"] = json!((eta * 10.0).round() / 10.0);
        }
        if !self.message.is_empty() {
            v["message"] = json!(self.message);
        }
        let _ = writeln!(self.out, "{v}");
        let _ = self.out.flush();
        self.last_emit = Some(Instant::now());
    }
}

impl Progress {
    /// A reporter that follows the run's output settings, writing to stderr.
    pub fn new(ui: &Ui, task: &str, total: u64) -> Progress {
        if ui.verbosity < 0 {
            return Progress { inner: Inner::Hidden };
        }
        if ui.json {
            return Progress::json_to(task, total, Box::new(std::io::stderr()));
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix:>9.cyan.bold} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(task.to_string());
        Progress { inner: Inner::Bar(bar) }
    }

    /// A JSON-lines reporter writing to any sink (used by tests and log files).
    pub fn json_to(task: &str, total: u64, out: Box<dyn Write + Send>) -> Progress {
        let mut state = JsonState {
            task: task.to_string(),
            done: 0,
            total,
            message: String::new(),
            started: Instant::now(),
            last_emit: None,
            out,
        };
        state.emit("start");
        // The first item done is reported at once; the interval applies from then on.
        state.last_emit = None;
        Progress { inner: Inner::Json(Mutex::new(state)) }
    }

    /// Marks `n` more items done.
    pub fn inc(&self, n: u64) {
        match &self.inner {
            Inner::Bar(b) => b.inc(n),
            Inner::Json(m) => {
                if let Ok(mut s) = m.lock() {
                    s.done += n;
                    if s.last_emit.is_none_or(|t| t.elapsed() >= JSON_INTERVAL) {
                        s.emit("progress");
                    }
                }
            }
            Inner::Hidden => {}
        }
    }

    /// Sets the short status text (cost so far, loss, ...).
    pub fn set_message(&self, msg: &str) {
        match &self.inner {
            Inner::Bar(b) => b.set_message(msg.to_string()),
            Inner::Json(m) => {
                if let Ok(mut s) = m.lock() {
                    // A new message is news (a provider batch's progress comes only this way).
                    let changed = s.message != msg;
                    s.message = msg.to_string();
                    if changed && s.last_emit.is_some_and(|t| t.elapsed() >= JSON_INTERVAL) {
                        s.emit("progress");
                    }
                }
            }
            Inner::Hidden => {}
        }
    }

    /// Ends the task; the final state is always reported.
    pub fn finish(&self) {
        match &self.inner {
            Inner::Bar(b) => b.finish(),
            Inner::Json(m) => {
                if let Ok(mut s) = m.lock() {
                    s.emit("finish");
                }
            }
            Inner::Hidden => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_progress_is_rate_limited_and_ends_with_the_final_state() {
        let sink = Sink::default();
        let p = Progress::json_to("distill", 1000, Box::new(sink.clone()));
        for _ in 0..1000 {
            p.inc(1);
        }
        p.set_message("$0.12");
        p.finish();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        // start, the first progress line, finish: a thousand increments within 2 s write 3 lines.
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["event"], "start");
        assert_eq!(lines[0]["done"], 0);
        assert_eq!(lines[1]["event"], "progress");
        let last = lines.last().unwrap();
        assert_eq!(last["event"], "finish");
        assert_eq!(last["done"], 1000);
        assert_eq!(last["total"], 1000);
        assert_eq!(last["task"], "distill");
        assert_eq!(last["message"], "$0.12");
    }
}
