//! Everything that can stop the teacher, each with what went wrong, where, and how to fix it.

use std::path::PathBuf;

/// Why a teacher request, or the teacher as a whole, failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TeacherError {
    /// An error retrying cannot fix: bad key, no access, unknown model, exhausted quota, a request
    /// the provider rejects.
    #[error("{message}")]
    Fatal {
        /// What happened, with the HTTP status and the provider's own words (keys redacted).
        message: String,
        /// How to fix it.
        hint: String,
    },
    /// A request kept failing with errors that usually pass (429, 5xx, timeouts, dropped
    /// connections) until its retries ran out.
    #[error("request {request} failed {attempts} times; last: {last}")]
    RetriesExhausted {
        /// The request (its user message, shortened).
        request: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// No request succeeded for `teacher.stall_timeout`.
    #[error("no answer from the teacher for {waited}; last failure: {last}")]
    Stalled {
        /// How long (human-readable).
        waited: String,
        /// The last failure.
        last: String,
    },
    /// Sending the next request could exceed `teacher.budget_usd`.
    #[error(
        "the budget of ${cap:.4} would be exceeded: ${spent:.4} spent, ${reserved:.4} in flight, and the next request may cost up to ${next:.4}"
    )]
    Budget {
        /// The cap.
        cap: f64,
        /// Spent so far (this run and earlier ones).
        spent: f64,
        /// Worst case of requests in flight.
        reserved: f64,
        /// Worst case of the request that was not sent.
        next: f64,
    },
    /// The replay transcript holds no answer for a request.
    #[error("the transcript `{}` has no answer for the request {request}", path.display())]
    ReplayMiss {
        /// The transcript.
        path: PathBuf,
        /// The request (its user message, shortened).
        request: String,
    },
    /// A line of the replay transcript is not a recorded request and response.
    #[error("`{}` line {line}: {message}", path.display())]
    Transcript {
        /// The transcript.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The cache and journal file could not be read or written.
    #[error("journal `{}`: {message}", path.display())]
    Journal {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The environment variable that should hold the API key is not set.
    #[error("the API key variable `{env}` is not set")]
    MissingKey {
        /// The variable's name.
        env: String,
    },
    /// The run is stopping after an earlier error; this request was not sent.
    #[error("not sent: the run is stopping after an earlier error")]
    Halted,
    /// The teacher settings cannot work (no price for a budget, a bad URL, ...).
    #[error("{message}")]
    Config {
        /// What is wrong.
        message: String,
        /// How to fix it.
        hint: String,
    },
}

impl TeacherError {
    /// How to fix it, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            TeacherError::Fatal { hint, .. } | TeacherError::Config { hint, .. } => Some(hint.clone()),
            TeacherError::RetriesExhausted { .. } => Some(
                "the provider is failing or overloaded; answered requests are saved, so running the same command again resumes (raise `teacher.max_retries` or lower `teacher.max_concurrency` if it keeps happening)".into(),
            ),
            TeacherError::Stalled { .. } => Some(
                "answered requests are saved; run the same command again when the provider is back (`teacher.stall_timeout` sets how long to wait)".into(),
            ),
            TeacherError::Budget { .. } => Some(
                "everything answered so far is saved; raise `teacher.budget_usd` and run the same command again to resume".into(),
            ),
            TeacherError::ReplayMiss { .. } => Some(
                "the replay provider only serves recorded requests: regenerate the transcript for this recipe, or use a live provider".into(),
            ),
            TeacherError::Transcript { .. } => Some(
                "each line must be {\"request\": {\"model\": ..., \"messages\": [...]}, \"response\": {\"content\": ..., \"finish_reason\": \"stop\"}}".into(),
            ),
            TeacherError::Journal { .. } => Some(
                "check that the data directory is writable and the disk is not full; a corrupt journal can be deleted (answered requests are then paid again)".into(),
            ),
            TeacherError::Halted => None,
            TeacherError::MissingKey { env } => {
                Some(format!("export {env}=... in the shell or job that runs retort (the recipe names the variable in `teacher.api_key_env`)"))
            }
        }
    }

    /// True when a rerun continues where this run stopped (a limit, not a mistake).
    pub fn is_resumable(&self) -> bool {
        matches!(
            self,
            TeacherError::Budget { .. }
                | TeacherError::Stalled { .. }
                | TeacherError::RetriesExhausted { .. }
        )
    }
}
