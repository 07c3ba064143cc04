//! Exit codes, the contract with schedulers (cron, Slurm, Kubernetes) and scripts.

use std::fmt;

/// What the process exit code means. Stable: scripts and job specs depend on these numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything worked.
    Ok = 0,
    /// Bad input or configuration: fix the recipe, a file or an argument and run again.
    BadInput = 1,
    /// A bug or an environment failure retort could not attribute to the input.
    Internal = 2,
    /// The quality gate failed: the model works but is not good enough to ship.
    GateFailed = 3,
    /// A budget or time limit was reached; the work so far is saved and a rerun resumes.
    Limit = 4,
}

impl Exit {
    /// The numeric exit code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// An error with an exit code, a message and an optional hint, shown as
/// `error: <message>` and `hint: <hint>`.
#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
    pub hint: Option<String>,
}

impl CliError {
    /// A bad-input error (exit 1).
    pub fn input(message: impl Into<String>) -> Self {
        CliError { exit: Exit::BadInput, message: message.into(), hint: None }
    }

    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// Text for `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok
  1  bad input or configuration (the message says what and where)
  2  internal error
  3  quality gate failed
  4  budget or time limit reached (resumable: run the same command again)";
