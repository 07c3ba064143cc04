//! `mock_teacher`: the test fake of the OpenAI and Anthropic APIs as a process, for
//! benchmarks. Answers every request with a short text derived from its user message.
//!
//!     cargo run --release -p retort-teacher --features mock --example mock_teacher -- [--latency-ms N] [--rpm N]
//!
//! Prints its URL on the first line of stdout, then serves until killed. `GET /stats` returns how
//! many requests it answered and the most it saw in any 60-second window.

#![allow(clippy::print_stdout)] // the URL on stdout is this program's output

use std::time::Duration;

use retort_teacher::mock::{MockConfig, MockServer};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| -> Option<u64> {
        args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
    };
    let mut config =
        MockConfig::answering(|user| format!("Answer about {} words long.", user.split_whitespace().count()));
    config.latency = Duration::from_millis(value("--latency-ms").unwrap_or(0));
    config.rpm_limit = value("--rpm").map(|r| r as usize);
    let server = match MockServer::start(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln_safe(&format!("cannot start: {e}"));
            return std::process::ExitCode::from(2);
        }
    };
    println!("{}", server.url());
    loop {
        std::thread::park();
    }
}

fn eprintln_safe(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}
